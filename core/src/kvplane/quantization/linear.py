"""One linear layer held in a quantization method's format: the parameters the method
registered, checkpoint shards copied into them, and the product.

:class:`~kvplane.models.layers.linear.Linear` is this plus the platform's choice of
method; the experts of a mixture-of-experts layer are these too, one gate/up and one
down per expert (:mod:`kvplane.quantization.experts`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kvplane.quantization.params import ShardLayout, shard_target

if TYPE_CHECKING:
    # Annotations only: kvplane.plugins imports this package (circular at run time).
    from kvplane.plugins.types import LayerQuantSpec
    from kvplane.quantization.base import QuantMethod


class QuantizedLinear(torch.nn.Module):
    """``y = x @ W.T + b`` with ``W`` stored and multiplied by ``quant_method``.

    ``spec.output_sizes`` stacks several checkpoint matrices into one (QKV, gate/up):
    :meth:`load_shard` copies shard ``i`` of each parameter the method registered into
    its place (``shard_layouts``) before :meth:`process_weights_after_loading` runs once.
    """

    # Registered by the quantization method's create_weights, in the float format the
    # loader fills (a method may replace them in process_weights_after_loading).
    weight: torch.nn.Parameter
    bias: torch.nn.Parameter | None

    def __init__(self, quant_method: QuantMethod, spec: LayerQuantSpec) -> None:
        super().__init__()
        self.input_size = spec.input_size
        self.output_sizes = spec.shard_sizes
        self.output_size = spec.output_size
        self._set_method(quant_method, spec)

    def _set_method(self, quant_method: QuantMethod, spec: LayerQuantSpec) -> None:
        """Register ``quant_method``'s parameters for ``spec`` (none may exist yet)."""
        self._spec = spec
        self.shard_layouts: dict[str, ShardLayout] = {}
        self._whole_params_loaded: set[str] = set()
        self.quant_method = quant_method
        quant_method.create_weights(self, spec)

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
        check_dtype(name, loaded, target, self._spec.method)
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

    def process_weights_after_loading(self) -> None:
        self.quant_method.process_weights_after_loading(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, out]
        return self.quant_method.apply(self, x)


def check_dtype(name: str, loaded: torch.Tensor, target: torch.Tensor, method: str) -> None:
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
