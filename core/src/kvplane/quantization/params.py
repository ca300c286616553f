"""Parameters a quantization method registers on a linear layer, and where each output
shard of a stacked layer (QKV, gate/up) lies inside them."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class ShardLayout:
    """How the output shards of a :class:`~kvplane.models.layers.linear.Linear` lie in
    one of its parameters, so the loader can copy each checkpoint tensor to its place.

    * ``output_dim``: the dimension indexed by output rows; shard ``i`` is the slice
      from ``sum(output_sizes[:i]) // packed_factor`` of ``output_sizes[i] //
      packed_factor`` entries. None: the tensor is per layer and every shard's
      checkpoint tensor must hold the same values (an input permutation, say).
    * ``packed_factor``: output rows per stored element along ``output_dim`` (8 for
      int4 values packed into int32 along the outputs).
    * ``per_shard``: dimension 0 has one entry per shard (the per-tensor scale each of
      Q, K and V was quantized with); the checkpoint's scalar goes to entry ``i``.
    """

    output_dim: int | None = 0
    packed_factor: int = 1
    per_shard: bool = False


def register_param(
    layer: torch.nn.Module,
    name: str,
    data: torch.Tensor,
    layout: ShardLayout | None = None,
) -> torch.nn.Parameter:
    """Register ``data`` as the frozen parameter ``name`` of ``layer``, recording its
    :class:`ShardLayout` (default: output rows along dimension 0) in
    ``layer.shard_layouts`` for the loader."""
    param = torch.nn.Parameter(data, requires_grad=False)
    layer.register_parameter(name, param)
    layouts = getattr(layer, "shard_layouts", None)
    if layouts is None:
        layouts = {}
        # torch's __setattr__ stub admits only Tensor | Module; nn.Module stores any value.
        layer.shard_layouts = layouts  # type: ignore[assignment]
    layouts[name] = layout or ShardLayout()
    return param


def shard_target(
    param: torch.Tensor,
    layout: ShardLayout,
    output_sizes: tuple[int, ...],
    shard_index: int,
) -> torch.Tensor:
    """The view of ``param`` that shard ``shard_index``'s checkpoint tensor fills."""
    if layout.per_shard:
        return param.data[shard_index]
    if layout.output_dim is None:
        return param.data
    start = sum(output_sizes[:shard_index])
    size = output_sizes[shard_index]
    if start % layout.packed_factor or size % layout.packed_factor:
        raise ValueError(
            f"output shard sizes {output_sizes} are not multiples of the packing "
            f"factor {layout.packed_factor}"
        )
    factor = layout.packed_factor
    return param.data.narrow(layout.output_dim, start // factor, size // factor)


def per_row_scales(
    scale: torch.Tensor,  # [output_size, 1] per channel, or [num_shards] per matrix
    shard_sizes: tuple[int, ...],
) -> torch.Tensor:  # float32 [output_size]
    """A checkpoint's weight scales, one per output row or one per stacked matrix, as one
    per output row (the FP8 / int8 values stay as they are: nothing is requantized)."""
    if scale.dim() == 2:
        return scale.view(-1).float()
    sizes = torch.tensor(shard_sizes, device=scale.device)
    return scale.float().repeat_interleave(sizes)
