"""Linear layers whose storage and matmul come from a quantization method."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvplane.models.layers.context import BuildContext
from kvplane.plugins.types import LayerQuantSpec


class Linear(torch.nn.Module):
    """``y = x @ W.T + b`` through the quantization method the platform picked.

    ``output_sizes`` lets several checkpoint matrices be stacked into one (QKV, gate/up):
    :meth:`load_shard` copies shard ``i`` into its rows before
    :meth:`process_weights_after_loading` runs once.
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
        spec = LayerQuantSpec(
            method=ctx.quantization if quantize else "none",
            input_size=input_size,
            output_size=self.output_size,
            params_dtype=ctx.dtype,
            has_bias=bias,
        )
        self.quant_method = ctx.platform.quant_method(spec)
        self.quant_method.create_weights(self, spec)

    def load_shard(self, name: str, loaded: torch.Tensor, shard_index: int = 0) -> None:
        """Copy checkpoint tensor ``loaded`` (a weight or bias) into rows of shard
        ``shard_index``. Raises ValueError naming the tensor on a shape mismatch."""
        param = self.weight if name == "weight" else self.bias
        if param is None:
            raise ValueError(f"checkpoint has a {name} this layer does not use")
        start = sum(self.output_sizes[:shard_index])
        rows = param.data.narrow(0, start, self.output_sizes[shard_index])
        if rows.shape != loaded.shape:
            raise ValueError(
                f"shape mismatch for {name} shard {shard_index}: "
                f"checkpoint {tuple(loaded.shape)}, model {tuple(rows.shape)}"
            )
        rows.copy_(loaded)

    def load_fused(self, name: str, loaded: torch.Tensor) -> None:
        """Copy checkpoint tensor ``loaded`` that already holds every shard stacked along
        dim 0 (Phi-3's ``qkv_proj`` / ``gate_up_proj``, GPT-2's ``c_attn``): split by
        ``output_sizes`` and load each through :meth:`load_shard`, so per-shard
        handling stays in one place. Raises ValueError on a row-count mismatch."""
        if loaded.shape[0] != self.output_size:
            raise ValueError(
                f"fused {name} has {loaded.shape[0]} rows, layer expects {self.output_size} "
                f"(shards {self.output_sizes})"
            )
        for shard_index, shard in enumerate(loaded.split(self.output_sizes, dim=0)):
            self.load_shard(name, shard, shard_index)

    def process_weights_after_loading(self) -> None:
        self.quant_method.process_weights_after_loading(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, out]
        return self.quant_method.apply(self, x)
