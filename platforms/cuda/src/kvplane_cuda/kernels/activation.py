"""Gated activations in Triton: ``act(x[..., :I]) * x[..., I:]`` with float32 math.

One program per (token, chunk of ``I``); the gate and up halves are read once and the
product is written in the input dtype, as :func:`kvplane.ops.reference.silu_and_mul`
and :func:`~kvplane.ops.reference.gelu_and_mul` do.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_SILU = 0
_GELU = 1
_GELU_TANH = 2
_ACTIVATIONS = {"none": _GELU, "tanh": _GELU_TANH}

#: Widest chunk of the intermediate size one program handles.
_MAX_BLOCK = 1024


@triton.jit
def _gated_kernel(
    x_ptr,
    x_row_stride,
    out_ptr,
    out_row_stride,
    intermediate_size,
    ACTIVATION: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < intermediate_size
    x_row = x_ptr + row * x_row_stride
    gate = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_row + intermediate_size + cols, mask=mask, other=0.0).to(tl.float32)
    # exp() only of non-positive arguments: it never overflows, whatever the input.
    if ACTIVATION == 0:  # silu: x * sigmoid(x)
        decay = tl.exp(-tl.abs(gate))
        activated = gate * tl.where(gate >= 0.0, 1.0, decay) / (1.0 + decay)
    elif ACTIVATION == 1:  # exact gelu
        activated = 0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476))
    else:  # tanh-approximated gelu
        inner = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
        decay = tl.exp(-2.0 * tl.abs(inner))
        tanh = (1.0 - decay) / (1.0 + decay)
        activated = 0.5 * gate * (1.0 + tl.where(inner >= 0.0, tanh, -tanh))
    out = (activated * up).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * out_row_stride + cols, out, mask=mask)


def _gated(x: torch.Tensor, activation: int) -> torch.Tensor:  # [..., 2*I] -> [..., I]
    intermediate_size = x.shape[-1] // 2
    rows = x.reshape(-1, x.shape[-1])  # [num_tokens, 2 * I]
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape[0], intermediate_size, dtype=x.dtype, device=x.device)
    if rows.shape[0] > 0 and intermediate_size > 0:
        block = min(triton.next_power_of_2(intermediate_size), _MAX_BLOCK)
        grid = (rows.shape[0], triton.cdiv(intermediate_size, block))
        _gated_kernel[grid](
            rows,
            rows.stride(0),
            out,
            out.stride(0),
            intermediate_size,
            ACTIVATION=activation,
            BLOCK=block,
            num_warps=4,
        )
    return out.view(*x.shape[:-1], intermediate_size)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:  # [T, 2*I] -> [T, I]
    """``silu(x[..., :I]) * x[..., I:]`` (SwiGLU)."""
    return _gated(x, _SILU)


def gelu_and_mul(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """``gelu(x[..., :I]) * x[..., I:]`` (GeGLU); ``approximate`` is "none" or "tanh"."""
    if approximate not in _ACTIVATIONS:
        raise ValueError(f"gelu approximate must be 'none' or 'tanh', got {approximate!r}")
    return _gated(x, _ACTIVATIONS[approximate])
