"""RMSNorm and fused residual-add + RMSNorm in Triton: one program per row.

Rows up to ``_MAX_SINGLE_BLOCK`` channels stay in registers (one read, one write); wider
rows take two passes over the row, the second reading back what the first wrote. Math is
float32 and follows :func:`kvplane.ops.reference.rms_norm` step by step: the residual sum
is rounded to the input dtype before it is normalised, exactly as the reference does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: Widest row normalised from registers in one pass (Llama-3-70B's 8192 fits).
_MAX_SINGLE_BLOCK = 8192
#: Chunk width of the two-pass path for wider rows.
_CHUNK = 4096


@triton.jit
def _load_summed(x_row, residual_row, sum_row, offsets, mask, HAS_RESIDUAL: tl.constexpr):
    # The row chunk in float32: x, or x + residual rounded to the sum's dtype (as the
    # reference rounds it) and stored there for the caller.
    x = tl.load(x_row + offsets, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(residual_row + offsets, mask=mask, other=0.0)
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(sum_row.dtype.element_ty)
        tl.store(sum_row + offsets, x, mask=mask)
    return x.to(tl.float32)


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    x_row_stride,
    x_group_size,  # rows of x per outer index: x is [outer, group, hidden] (1: 2-D rows)
    x_group_stride,
    residual_ptr,
    residual_row_stride,
    sum_ptr,  # where the residual sum goes (may alias x or residual)
    sum_row_stride,
    out_ptr,
    out_row_stride,
    weight_ptr,
    hidden_size: tl.constexpr,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + (row // x_group_size) * x_row_stride + (row % x_group_size) * x_group_stride
    residual_row = residual_ptr + row * residual_row_stride
    sum_row = sum_ptr + row * sum_row_stride
    out_row = out_ptr + row * out_row_stride
    cols = tl.arange(0, BLOCK)
    if SINGLE_BLOCK:
        mask = cols < hidden_size
        x = _load_summed(x_row, residual_row, sum_row, cols, mask, HAS_RESIDUAL)
        variance = tl.sum(x * x, axis=0) / hidden_size
        normed = x * tl.math.rsqrt(variance + eps)
        weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_row + cols, (normed * weight).to(out_ptr.dtype.element_ty), mask=mask)
    else:
        # Pass 1: the residual sum (written out) and the sum of squares.
        squares = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, hidden_size, BLOCK):
            offsets = start + cols
            mask = offsets < hidden_size
            x = _load_summed(x_row, residual_row, sum_row, offsets, mask, HAS_RESIDUAL)
            squares += x * x
        rstd = tl.math.rsqrt(tl.sum(squares, axis=0) / hidden_size + eps)
        # Pass 2: normalise; the same threads read back the sum they stored in pass 1.
        source_row = sum_row if HAS_RESIDUAL else x_row
        for start in range(0, hidden_size, BLOCK):
            offsets = start + cols
            mask = offsets < hidden_size
            x = tl.load(source_row + offsets, mask=mask, other=0.0).to(tl.float32)
            weight = tl.load(weight_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            normed = (x * rstd) * weight
            tl.store(out_row + offsets, normed.to(out_ptr.dtype.element_ty), mask=mask)


def _as_rows(x: torch.Tensor) -> torch.Tensor:  # [..., hidden] -> [rows, hidden]
    """A 2-D view with unit channel stride (a copy only when no such view exists)."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _strided_rows(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """``x`` as rows the kernel can address: ``(tensor, (row stride, group size, group
    stride))``. A 3-D ``[outer, group, hidden]`` view with unit channel stride is read in
    place (e.g. the per-head query slice of a fused QKV output, whose rows cannot be one
    2-D view); anything else becomes 2-D rows (a copy only when no such view exists)."""
    if x.dim() == 3 and x.stride(-1) == 1:
        return x, (x.stride(0), x.shape[1], x.stride(1))
    rows = _as_rows(x)
    return rows, (rows.stride(0), 1, 0)


def _launch(
    x: torch.Tensor,  # rows of hidden_size channels, unit channel stride (see x_strides)
    residual: torch.Tensor | None,  # [num_tokens, hidden_size] or None
    summed: torch.Tensor | None,  # [num_tokens, hidden_size], x.dtype, or None
    out: torch.Tensor,  # [num_tokens, hidden_size]
    weight: torch.Tensor,  # [hidden_size]
    eps: float,
    x_strides: tuple[int, int, int] | None = None,  # row stride, group size, group stride
) -> None:
    num_tokens, hidden_size = out.shape
    if num_tokens == 0:
        return
    if x_strides is None:
        x_strides = (x.stride(0), 1, 0)
    single_block = hidden_size <= _MAX_SINGLE_BLOCK
    block = triton.next_power_of_2(hidden_size) if single_block else _CHUNK
    if residual is not None and summed is not None:
        has_residual, residual_arg, sum_arg = True, residual, summed
    else:  # the kernel never reads these pointers; x stands in for them
        has_residual, residual_arg, sum_arg = False, x, x
    _rms_norm_kernel[(num_tokens,)](
        x,
        *x_strides,
        residual_arg,
        residual_arg.stride(0),
        sum_arg,
        sum_arg.stride(0),
        out,
        out.stride(0),
        weight,
        hidden_size,
        eps,
        HAS_RESIDUAL=has_residual,
        SINGLE_BLOCK=single_block,
        BLOCK=block,
        num_warps=min(max(block // 512, 1), 16),
    )


def rms_norm(
    x: torch.Tensor,  # [..., hidden_size]
    weight: torch.Tensor,  # [hidden_size]
    eps: float,
) -> torch.Tensor:  # x's shape, contiguous
    """``x / sqrt(mean(x**2) + eps) * weight`` over the last dim; never mutates its
    inputs."""
    rows, x_strides = _strided_rows(x)
    out = torch.empty((x.numel() // x.shape[-1], x.shape[-1]), dtype=x.dtype, device=x.device)
    _launch(rows, None, None, out, weight.contiguous(), eps, x_strides)
    return out.view(x.shape)


def fused_add_rms_norm(
    x: torch.Tensor,  # [num_tokens, hidden_size]
    residual: torch.Tensor,  # [num_tokens, hidden_size]
    weight: torch.Tensor,  # [hidden_size]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(rms_norm(x + residual), x + residual)`` in one pass over the rows.

    The sum (in ``x.dtype``) is written into ``residual`` when it has ``x``'s dtype,
    else into ``x``, and that tensor is returned: the reference's contract lets either
    input be overwritten, and callers use only the returned tensors.
    """
    rows = _as_rows(x)
    residual_rows = _as_rows(residual)
    summed = residual_rows if residual.dtype == x.dtype else rows
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    _launch(rows, residual_rows, summed, out, weight.contiguous(), eps)
    return out.view(x.shape), summed.view(x.shape)
