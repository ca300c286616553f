"""Linear layers whose storage and matmul come from the quantization method the
platform picks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from kvplane.models.layers.context import BuildContext
from kvplane.plugins.types import LayerQuantSpec
from kvplane.quantization.linear import QuantizedLinear
from kvplane.quantization.params import ShardLayout


class Linear(QuantizedLinear):
    """``y = x @ W.T + b`` through the quantization method the platform picked for it.

    ``output_sizes`` lets several checkpoint matrices be stacked into one (QKV, gate/up):
    :meth:`load_shard` copies shard ``i`` of each parameter the method registered into
    its place (``shard_layouts``) before :meth:`process_weights_after_loading` runs once.
    """

    def __init__(
        self,
        input_size: int,
        output_sizes: Sequence[int],
        bias: bool,
        ctx: BuildContext,
        quantize: bool = True,
    ) -> None:
        output_sizes = tuple(output_sizes)
        spec = LayerQuantSpec(
            method=ctx.quantization.method if quantize else "none",
            input_size=input_size,
            output_size=sum(output_sizes),
            params_dtype=ctx.dtype,
            has_bias=bias,
            options=ctx.quantization.options if quantize else (),
            output_sizes=output_sizes,
        )
        super().__init__(ctx.platform.quant_method(spec), spec)
        self._platform = ctx.platform

    def leave_unquantized(self) -> None:
        """Switch this layer to the float method before loading (a layer the
        checkpoint's quantization config lists as not converted)."""
        if self._spec.method == "none":
            return
        for name in list(self.shard_layouts):
            delattr(self, name)
        spec = replace(self._spec, method="none", options=())
        self._set_method(self._platform.quant_method(spec), spec)

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
