"""CUDA ops in plain torch that never wait for the GPU.

Triton kernels (fused rotary, norms, sampling) come in a later issue in
:mod:`kvplane_cuda.kernels`. Until then this module offers the ops whose plain-torch
form can beat the reference without a host sync: torch's fused ``rms_norm``, an in-place
fused add + norm, the gated activations with one temporary, and ``reshape_and_cache``
without the boolean indexing (a device-to-host sync per layer) the reference uses for
skipped slots. ``rotary_embedding`` and ``top_k_top_p_sample`` come from the reference.
Each op has the signature and semantics of its namesake in :mod:`kvplane.ops.reference`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F


def rms_norm(
    x: torch.Tensor,  # [num_tokens, hidden_size]
    weight: torch.Tensor,  # [hidden_size]
    eps: float,
) -> torch.Tensor:  # [num_tokens, hidden_size]
    """``x / sqrt(mean(x**2) + eps) * weight``; never mutates its inputs."""
    return F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps).to(x.dtype)


def fused_add_rms_norm(
    x: torch.Tensor,  # [num_tokens, hidden_size]
    residual: torch.Tensor,  # [num_tokens, hidden_size]
    weight: torch.Tensor,  # [hidden_size]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(rms_norm(x + residual), x + residual)``, the sum written into
    ``residual`` when the dtypes match (the contract allows it)."""
    if x.dtype == residual.dtype and residual.shape == x.shape:
        summed = residual.add_(x)
    else:
        summed = (x.float() + residual.float()).to(x.dtype)
    return rms_norm(summed, weight, eps), summed


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:  # [T, 2*I] -> [T, I]
    """``silu(x[..., :I]) * x[..., I:]`` (SwiGLU)."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate.float()).mul_(up).to(x.dtype)


def gelu_and_mul(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """``gelu(x[..., :I]) * x[..., I:]`` (GeGLU); ``approximate`` is "none" or "tanh"."""
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate.float(), approximate=approximate).mul_(up).to(x.dtype)


def reshape_and_cache(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_size]
    slot_mapping: torch.Tensor,  # [num_tokens] int64; slot = block * block_size + offset
) -> None:
    """Write each token's key and value at its slot, in place; slots < 0 are skipped.

    Without a host sync: a skipped token is redirected to the slot of the batch's first
    written token and carries that token's key and value, so the duplicate write is
    harmless; if no token is written, the redirect rewrites slot 0 with its own content.
    """
    if slot_mapping.numel() == 0:
        return
    num_kv_heads, head_size = kv_cache.shape[-2:]
    flat_cache = kv_cache.view(2, -1, num_kv_heads, head_size)  # [2, num_slots, ...]
    valid = slot_mapping >= 0  # [num_tokens]
    # Index tensors, never Python ints: reading a device value would wait for the GPU.
    first = valid.int().argmax().view(1)  # the first written token (0 if none)
    any_valid = valid.any()
    fallback_slot = torch.where(any_valid, slot_mapping.index_select(0, first), 0)  # [1]
    slots = torch.where(valid, slot_mapping, fallback_slot)
    keep = valid.view(-1, 1, 1)
    for index, new in enumerate((key, value)):
        new = new.to(kv_cache.dtype)
        # The content written by skipped tokens: the first written token's, else slot 0's.
        filler = torch.where(any_valid, new.index_select(0, first), flat_cache[index, :1])
        flat_cache[index].index_copy_(0, slots, torch.where(keep, new, filler))


def cuda_ops() -> dict[str, Callable[..., Any]]:
    """This module's ops keyed by stable name; the others fall back to the reference."""
    return {
        "rms_norm": rms_norm,
        "fused_add_rms_norm": fused_add_rms_norm,
        "silu_and_mul": silu_and_mul,
        "gelu_and_mul": gelu_and_mul,
        "reshape_and_cache": reshape_and_cache,
    }
