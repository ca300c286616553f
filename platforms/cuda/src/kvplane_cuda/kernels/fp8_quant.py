"""Per-token FP8 (e4m3) quantization of activations in Triton: one pass over each row.

``scale[t] = max(max|x[t]| / 448, MIN_SCALE)`` and ``q[t] = x[t] / scale[t]`` saturated
to e4m3, as :func:`kvplane.quantization.fp8.quantize_rows_fp8` computes in torch, in one
kernel instead of the four (abs, amax, divide, cast) torch launches.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvplane.quantization.fp8 import FP8_DTYPE, FP8_MAX, MIN_SCALE

#: Widest row chunk one loop iteration reads.
_MAX_BLOCK = 4096


@triton.jit
def round_to_e4m3_grid(values):
    """``values`` (float32, within +-448) rounded half-to-even to the nearest e4m3 value,
    so the cast after it is exact. The hardware cast rounds the same way; the rounding is
    spelled out because Triton's interpreter truncates instead (and drops the carry into
    the exponent), which would leave the CPU tests unable to check the codes. Shared
    with the FP8 KV-cache write (:mod:`.cache`)."""
    bits = values.to(tl.int32, bitcast=True)
    exponent = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)  # e4m3 subnormals below 2^-6
    # The grid step 2^(exponent - 3) (3 mantissa bits) and its inverse, built exactly.
    step = ((exponent - 3 + 127) << 23).to(tl.float32, bitcast=True)
    inverse_step = ((127 - exponent + 3) << 23).to(tl.float32, bitcast=True)
    magic = 12582912.0  # 1.5 * 2^23: adding and subtracting it rounds to an integer
    magnitude = ((tl.abs(values) * inverse_step + magic) - magic) * step
    # The sign put back after rounding the magnitude, so a negative value that rounds to
    # zero gives -0.0 as the cast (and torch) does, not +0.0. A product, because Triton's
    # negation is 0 - x, which gives +0.0.
    return tl.where(values < 0, magnitude * -1.0, magnitude)


@triton.jit
def _quantize_rows_kernel(
    x_ptr,
    x_row_stride,
    out_ptr,
    scale_ptr,
    num_columns,
    FP8_MAX_VALUE: tl.constexpr,
    MIN_SCALE_VALUE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_row_stride
    max_abs = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, num_columns, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        values = tl.load(x_row + cols, mask=cols < num_columns, other=0.0).to(tl.float32)
        max_abs = tl.maximum(max_abs, tl.abs(values))
    scale = tl.maximum(tl.div_rn(tl.max(max_abs, axis=0), FP8_MAX_VALUE), MIN_SCALE_VALUE)
    tl.store(scale_ptr + row, scale)
    out_row = out_ptr + row * num_columns
    for start in range(0, num_columns, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < num_columns
        values = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        # IEEE division, as torch divides: the GPU's default "/" is approximate and
        # would move values that lie at a rounding boundary to the neighbouring code.
        scaled = tl.clamp(tl.div_rn(values, scale), -FP8_MAX_VALUE, FP8_MAX_VALUE)
        tl.store(out_row + cols, round_to_e4m3_grid(scaled).to(out_ptr.dtype.element_ty), mask=mask)


def quantize_rows_fp8(
    x: torch.Tensor,  # [num_rows, num_columns] float, unit stride along columns
) -> tuple[torch.Tensor, torch.Tensor]:  # e4m3 [num_rows, num_columns], f32 [num_rows, 1]
    """Per-row e4m3 quantization of ``x`` and the scales, ``x ~ q * scale``."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"expected a 2-D row-major tensor, got shape {tuple(x.shape)}")
    num_rows, num_columns = x.shape
    out = torch.empty(num_rows, num_columns, dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty(num_rows, 1, dtype=torch.float32, device=x.device)
    if num_rows == 0:
        return out, scale
    block = min(_MAX_BLOCK, triton.next_power_of_2(num_columns))
    _quantize_rows_kernel[(num_rows,)](
        x,
        x.stride(0),
        out,
        scale,
        num_columns,
        FP8_MAX_VALUE=FP8_MAX,
        MIN_SCALE_VALUE=MIN_SCALE,
        BLOCK=block,
    )
    return out, scale
