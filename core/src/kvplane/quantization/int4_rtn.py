"""Round-to-nearest int4 quantizers that write GPTQ and AWQ checkpoint layouts.

They turn a float weight ``[output_size, input_size]`` into exactly the tensors a GPTQ or
AWQ (GEMM) checkpoint holds (layouts in :mod:`kvplane.quantization.int4_packing`), so a
quantization method can quantize float checkpoints at load time and tests can build packed
layers without a quantization toolkit. No calibration: each (group, output column) gets
the min/max grid of its values, widened to include 0.

Guarantee: every weight value dequantizes to within half a step (``scale / 2``, up to
float32 rounding) of the original, on the grid ``(q - z) * scale`` with integer ``q`` in
``[0, 15]``. Two details keep it: scales are rounded *up* to float16 (the checkpoint
dtype) so the grid still spans the range; and in GPTQ v1 (stored ``z - 1``) a zero point of
0 cannot be stored, so such groups use ``z = 1`` with the scale widened to ``xmax / 14``.
"""

from __future__ import annotations

import torch

from kvplane.quantization.int4_packing import (
    AWQ_NIBBLE_ORDER,
    PACK_FACTOR,
    pack_int4,
    sequential_g_idx,
)

_MAX_Q = 15
#: Smallest normal float16: smaller scales would lose precision in the checkpoint dtype.
_MIN_SCALE = 2.0**-14
_MAX_SCALE = 65504.0


def _check_weight(weight: torch.Tensor, group_size: int) -> tuple[int, int]:
    """``(input_size, resolved group_size)`` of a weight to quantize."""
    if weight.dim() != 2 or not weight.dtype.is_floating_point:
        raise ValueError(
            f"weight must be a 2-D float tensor [output_size, input_size], "
            f"got {weight.dtype} {list(weight.shape)}"
        )
    output_size, input_size = weight.shape
    if output_size % PACK_FACTOR or input_size % PACK_FACTOR:
        raise ValueError(f"weight sizes must be multiples of 8, got {list(weight.shape)}")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("weight has non-finite values")
    if group_size == -1:
        group_size = input_size
    if group_size <= 0:
        raise ValueError(f"group_size must be positive or -1, got {group_size}")
    return input_size, group_size


def _group_ranges(
    rows: torch.Tensor,  # [K, N] float32
    groups: torch.Tensor,  # [K] int64
    num_groups: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # ([num_groups, N], [num_groups, N])
    """Per (group, column) min and max of ``rows``, widened to include 0 (so that 0 is
    near the grid and an empty group gets an empty range)."""
    index = groups[:, None].expand_as(rows)  # [K, N]
    zeros = torch.zeros(num_groups, rows.shape[1], dtype=torch.float32, device=rows.device)
    low = zeros.scatter_reduce(0, index, rows, "amin", include_self=True)
    high = zeros.scatter_reduce(0, index, rows, "amax", include_self=True)
    return low, high


def _float16_scale(raw: torch.Tensor) -> torch.Tensor:  # float16, >= raw
    """``raw`` rounded up to float16 (never down: a smaller step would not span the range)."""
    clamped = raw.clamp(_MIN_SCALE, _MAX_SCALE)
    scale = clamped.to(torch.float16)
    # The next float16 up of a positive finite value is its bit pattern plus one.
    bumped = (scale.view(torch.int16) + 1).view(torch.float16)
    return torch.where(scale.float() < clamped, bumped, scale)


def _asymmetric_grid(
    low: torch.Tensor, high: torch.Tensor, min_zero: int
) -> tuple[torch.Tensor, torch.Tensor]:  # (scales float16, zeros int64), both [G, N]
    scales = _float16_scale((high - low) / _MAX_Q)
    zeros = torch.round(-low / scales.float()).clamp(0, _MAX_Q).long()
    if min_zero:
        # z = 0 has no stored value here (v1 stores z - 1): use z = 1, widening the step so
        # that 14 steps cover the top. low >= -scale/2 already, and a wider step keeps it so.
        widened = _float16_scale(torch.maximum(high / (_MAX_Q - 1), scales.float()))
        scales = torch.where(zeros == 0, widened, scales)
        zeros = zeros.clamp_min(1)
    return scales, zeros


def _quantize_rows(
    rows: torch.Tensor,  # [K, N] float32
    groups: torch.Tensor,  # [K] int64
    scales: torch.Tensor,  # [G, N] float16
    zeros: torch.Tensor,  # [G, N] int64
) -> torch.Tensor:  # [K, N] int64 in [0, 15]
    steps = torch.round(rows / scales.float()[groups])
    return (steps + zeros[groups]).clamp(0, _MAX_Q).long()


def quantize_gptq_rtn(
    weight: torch.Tensor,  # [N, K]
    group_size: int,
    sym: bool = True,
    *,
    g_idx: torch.Tensor | None = None,  # [K]
    zeros_offset: int = 1,
) -> dict[str, torch.Tensor]:
    """Round-to-nearest int4 GPTQ tensors of ``weight`` ``[output_size, input_size]``.

    Returns ``qweight`` int32 ``[K/8, N]``, ``qzeros`` int32 ``[G, N/8]``, ``scales``
    float16 ``[G, N]`` and ``g_idx`` int32 ``[K]`` on ``weight``'s device, as a GPTQ
    checkpoint with ``bits: 4`` and this ``group_size`` (``-1``: one group) and ``sym``
    stores them. ``zeros_offset=1`` writes ``checkpoint_format: "gptq"`` (v1, stored
    ``z - 1``: what a loader reads back with ``zeros_offset=1``), 0 writes ``"gptq_v2"``.
    ``sym=True`` uses ``z = 8`` and ``scale = max|w| / 7.5`` per group; ``sym=False`` the
    group's ``[min, max]``. ``g_idx`` defaults to ``k // group_size`` (``desc_act: false``);
    pass an act-order map to group scattered rows (values in ``[0, ceil(K/group_size))``).
    ``weight`` is not modified.
    """
    input_size, group_size = _check_weight(weight, group_size)
    if zeros_offset not in (0, 1):
        raise ValueError(f"zeros_offset must be 0 or 1, got {zeros_offset}")
    num_groups = -(-input_size // group_size)
    if g_idx is None:
        g_idx = sequential_g_idx(input_size, group_size, weight.device)
    elif tuple(g_idx.shape) != (input_size,) or g_idx.dtype.is_floating_point:
        raise ValueError(
            f"g_idx must be an integer tensor of shape [input_size] = [{input_size}], "
            f"got {g_idx.dtype} {list(g_idx.shape)}"
        )
    elif g_idx.min() < 0 or g_idx.max() >= num_groups:
        raise ValueError(f"g_idx values must lie in [0, {num_groups}) for group_size {group_size}")
    groups = g_idx.to(weight.device).long()  # [K]
    rows = weight.t().float()  # [K, N]
    low, high = _group_ranges(rows, groups, num_groups)
    if sym:
        # The grid is -8..7 steps; max|w| at 7.5 steps is within half a step of either end.
        scales = _float16_scale(torch.maximum(-low, high) / (_MAX_Q / 2))
        zeros = torch.full_like(scales, (_MAX_Q + 1) // 2, dtype=torch.int64)
    else:
        scales, zeros = _asymmetric_grid(low, high, min_zero=zeros_offset)
    q = _quantize_rows(rows, groups, scales, zeros)
    return {
        "qweight": pack_int4(q, dim=0),
        "qzeros": pack_int4(zeros - zeros_offset, dim=1),
        "scales": scales,
        "g_idx": groups.to(torch.int32),
    }


def quantize_awq_rtn(weight: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:  # [N, K]
    """Round-to-nearest int4 AWQ (GEMM) tensors of ``weight`` ``[output_size, input_size]``.

    Returns ``qweight`` int32 ``[K, N/8]``, ``qzeros`` int32 ``[G, N/8]`` (true zero points)
    and ``scales`` float16 ``[G, N]``, interleaved as AutoAWQ's GEMM version stores them,
    asymmetric (``zero_point: true``) over each group's ``[min, max]``. No activation-aware
    scaling: this is the layout, not AWQ's search. ``weight`` is not modified.
    """
    input_size, group_size = _check_weight(weight, group_size)
    if input_size % group_size:
        raise ValueError(
            f"AWQ needs input_size ({input_size}) divisible by group_size ({group_size})"
        )
    num_groups = input_size // group_size
    groups = torch.arange(input_size, device=weight.device) // group_size  # [K]
    rows = weight.t().float()  # [K, N]
    low, high = _group_ranges(rows, groups, num_groups)
    scales, zeros = _asymmetric_grid(low, high, min_zero=0)
    q = _quantize_rows(rows, groups, scales, zeros)
    return {
        "qweight": pack_int4(q, dim=1, order=AWQ_NIBBLE_ORDER),
        "qzeros": pack_int4(zeros, dim=1, order=AWQ_NIBBLE_ORDER),
        "scales": scales,
    }
