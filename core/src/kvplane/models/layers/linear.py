"""Linear layers whose storage and matmul come from a quantization method."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from kvplane.models.layers.context import BuildContext
from kvplane.plugins.types import LayerQuantSpec
from kvplane.quantization.params import ShardLayout, shard_target


class Linear(torch.nn.Module):
    """``y = x @ W.T + b`` through the quantization method the platform picked.

    ``output_sizes`` lets several checkpoint matrices be stacked into one (QKV, gate/up):
    :meth:`load_shard` copies shard ``i`` of each parameter the method registered into
    its place (``shard_layouts``) before :meth:`process_weights_after_loading` runs once.
    """

    # Registered by the quantization method's create_weights, in the float format the
    # loader fills (a method may replace them in process_weights_after_loading).
    weight: torch.nn.Parameter
    bias: torch.nn.Parameter | None

    def __init__(
        self,
        input_size: int,
        output_sizes: Sequence[int],
        bias: bool,
        ctx: BuildContext,
        quantize: bool = True,
    ) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_sizes = tuple(output_sizes)
        self.output_size = sum(self.output_sizes)
        self._platform = ctx.platform
        self._spec = LayerQuantSpec(
            method=ctx.quantization.method if quantize else "none",
            input_size=input_size,
            output_size=self.output_size,
            params_dtype=ctx.dtype,
            has_bias=bias,
            options=ctx.quantization.options if quantize else (),
            output_sizes=self.output_sizes,
        )
        self._create_weights()

    def _create_weights(self) -> None:
        self.shard_layouts: dict[str, ShardLayout] = {}
        self._whole_params_loaded: set[str] = set()
        self.quant_method = self._platform.quant_method(self._spec)
        self.quant_method.create_weights(self, self._spec)

    def leave_unquantized(self) -> None:
        """Switch this layer to the float method before loading (a layer the
        checkpoint's quantization config lists as not converted)."""
        if self._spec.method == "none":
            return
        for name in list(self.shard_layouts):
            delattr(self, name)
        self._spec = replace(self._spec, method="none", options=())
        self._create_weights()

    def load_shard(self, name: str, loaded: torch.Tensor, shard_index: int = 0) -> str:
        """Copy checkpoint tensor ``loaded`` (a parameter the quantization method
        registered: ``weight``, ``bias``, ``weight_scale``, ...) into the part of that
        parameter shard ``shard_index`` fills, unless the method takes it itself; return
        the parameter name filled. Raises ValueError naming the tensor on a shape or
        dtype mismatch."""
        taken = self.quant_method.load_checkpoint_tensor(self, name, loaded, shard_index)
        if taken is not None:
            return taken
        param = getattr(self, name, None) if name in self.shard_layouts else None
        if not isinstance(param, torch.Tensor):
            raise ValueError(
                f"checkpoint has a {name} this layer does not use "
                f"(quantization {self._spec.method!r} reads {sorted(self.shard_layouts)})"
            )
        layout = self.shard_layouts[name]
        target = shard_target(param, layout, self.output_sizes, shard_index)
        _check_dtype(name, loaded, target, self._spec.method)
        if layout.output_dim is None and not layout.per_shard:
            # One tensor for the whole layer (GPTQ's g_idx): every shard must agree.
            if name in self._whole_params_loaded and not torch.equal(target, loaded):
                raise ValueError(f"{name} of shard {shard_index} differs from another shard's")
            self._whole_params_loaded.add(name)
        if target.shape != loaded.shape:
            if target.numel() == loaded.numel() == 1:  # a scale stored as [] or [1]
                loaded = loaded.reshape(target.shape)
            else:
                raise ValueError(
                    f"shape mismatch for {name} shard {shard_index}: "
                    f"checkpoint {tuple(loaded.shape)}, model {tuple(target.shape)}"
                )
        target.copy_(loaded)
        return name

    def load_fused(self, name: str, loaded: torch.Tensor) -> str:
        """Copy checkpoint tensor ``loaded`` that already holds every shard stacked along
        the output dimension (Phi-3's ``qkv_proj`` / ``gate_up_proj``, GPT-2's
        ``c_attn``): split by ``output_sizes`` and load each through :meth:`load_shard`,
        so per-shard handling stays in one place. A per-layer tensor (one scale for the
        whole fused matrix) goes to every shard. Raises ValueError on a size mismatch."""
        layout = self.shard_layouts.get(name, ShardLayout())
        if layout.per_shard or layout.output_dim is None:
            for shard_index in range(len(self.output_sizes)):
                filled = self.load_shard(name, loaded, shard_index)
            return filled
        dim, factor = layout.output_dim, layout.packed_factor
        sizes = [size // factor for size in self.output_sizes]
        if loaded.dim() <= dim or loaded.shape[dim] != sum(sizes):
            raise ValueError(
                f"fused {name} has shape {tuple(loaded.shape)}, layer expects {sum(sizes)} "
                f"along dimension {dim} (shards {self.output_sizes})"
            )
        for shard_index, shard in enumerate(loaded.split(sizes, dim=dim)):
            filled = self.load_shard(name, shard, shard_index)
        return filled

    def process_weights_after_loading(self) -> None:
        self.quant_method.process_weights_after_loading(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, out]
        return self.quant_method.apply(self, x)


def _check_dtype(name: str, loaded: torch.Tensor, target: torch.Tensor, method: str) -> None:
    """Refuse a checkpoint tensor whose number format differs from the parameter's
    (float weights into an FP8 layer, say): ``copy_`` would convert it silently."""
    if loaded.dtype == target.dtype:
        return
    both_wide_floats = all(
        t.dtype.is_floating_point and t.dtype.itemsize >= 2 for t in (loaded, target)
    )
    if not both_wide_floats:
        raise ValueError(
            f"{name} is {loaded.dtype} in the checkpoint but quantization {method!r} "
            f"stores it as {target.dtype}"
        )
