"""CPU implementations of the ops in :data:`kvplane.ops.OP_NAMES` (all but
:data:`REFERENCE_OPS`, which the CPU takes from the core's reference).

Each function has the signature and semantics of its namesake in
:mod:`kvplane.ops.reference` (the conformance kit compares them); they differ only in how
they get there: fused torch kernels where torch has one (``F.rms_norm``), fewer
temporaries, in-place writes where the contract allows them, and no full sort when
sampling with top-k alone. Like the reference, they compute in float32 and return the
input dtype, rounding once. The steps they share with it (the cos/sin halves, rotary
pairs, slot rows, sampling thresholds) come from :mod:`kvplane.ops.steps`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from kvplane.ops import steps


def rms_norm(
    x: torch.Tensor,  # [num_tokens, hidden_size]
    weight: torch.Tensor,  # [hidden_size]
    eps: float,
) -> torch.Tensor:  # [num_tokens, hidden_size]
    """``x / sqrt(mean(x**2) + eps) * weight`` through torch's fused kernel; never mutates
    its inputs."""
    normed = F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps)
    return normed.to(x.dtype)


def fused_add_rms_norm(
    x: torch.Tensor,  # [num_tokens, hidden_size]
    residual: torch.Tensor,  # [num_tokens, hidden_size]
    weight: torch.Tensor,  # [hidden_size]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(rms_norm(x + residual), x + residual)``.

    When ``x`` and ``residual`` share a dtype the sum is written into ``residual`` and
    returned as the second result (the contract lets implementations overwrite both
    inputs); an elementwise add of two equal low-precision dtypes rounds once, exactly as
    the reference's float32 add followed by a cast.
    """
    if x.dtype == residual.dtype and residual.shape == x.shape:
        summed = residual.add_(x)
    else:
        summed = steps.residual_sum(x, residual)
    return rms_norm(summed, weight, eps), summed


class _CosSinCache:
    """Float32 ``cos`` and ``sin`` tables split out of each ``cos_sin_cache`` once.

    Keyed by the cache tensor's identity (held weakly) and version counter, so an
    in-place update of the cache or a new cache at a recycled address is never served
    stale tables. Inference tensors have no version counter and are not cached.
    """

    def __init__(self, max_entries: int = 8) -> None:
        self._max_entries = max_entries
        self._entries: dict[int, tuple[Any, int, torch.Tensor, torch.Tensor]] = {}

    def get(self, cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The ``(cos, sin)`` tables of ``cos_sin_cache``, or ``None`` if uncacheable."""
        if cos_sin_cache.is_inference():
            return None
        entry = self._entries.get(id(cos_sin_cache))
        version = cos_sin_cache._version
        if entry is not None and entry[0]() is cos_sin_cache and entry[1] == version:
            return entry[2], entry[3]
        # [max_position, rotary_dim // 2] each, contiguous so index_select copies rows.
        cos, sin = (half.contiguous() for half in steps.cos_sin_halves(cos_sin_cache))
        if len(self._entries) >= self._max_entries:
            self._entries.pop(next(iter(self._entries)))
        self._entries[id(cos_sin_cache)] = (weakref.ref(cos_sin_cache), version, cos, sin)
        return cos, sin


_cos_sin_tables = _CosSinCache()


def rotary_embedding(
    positions: torch.Tensor,  # [num_tokens] int64
    query: torch.Tensor,  # [num_tokens, num_heads, head_size]
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
    cos_sin_cache: torch.Tensor,  # [max_position, rotary_dim] = cat(cos, sin) halves
    is_neox_style: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate the first ``rotary_dim`` channels of each head by its position's angles.

    Same semantics as the reference; returns new tensors. The float32 cos/sin tables are
    split from ``cos_sin_cache`` once per cache tensor, and the rotation writes straight
    into the output instead of concatenating halves.
    """
    tables = _cos_sin_tables.get(cos_sin_cache)
    if tables is None:
        cos_sin = cos_sin_cache.index_select(0, positions)  # [num_tokens, rotary_dim]
        cos, sin = (half.unsqueeze(1) for half in steps.cos_sin_halves(cos_sin))
    else:
        cos = tables[0].index_select(0, positions).unsqueeze(1)  # [num_tokens, 1, rot/2]
        sin = tables[1].index_select(0, positions).unsqueeze(1)
    return _rotate(query, cos, sin, is_neox_style), _rotate(key, cos, sin, is_neox_style)


def _rotate(
    x: torch.Tensor,  # [num_tokens, num_heads, head_size]
    cos: torch.Tensor,  # [num_tokens, 1, rotary_dim // 2] float32
    sin: torch.Tensor,  # [num_tokens, 1, rotary_dim // 2] float32
    is_neox_style: bool,
) -> torch.Tensor:  # [num_tokens, num_heads, head_size]
    rotary_dim = 2 * cos.shape[-1]
    out = torch.empty_like(x)
    if rotary_dim < x.shape[-1]:
        out[..., rotary_dim:] = x[..., rotary_dim:]
    x_rot = x[..., :rotary_dim].float()
    # Compute in float32; write the float result straight into ``out`` when it is float32,
    # else into a scratch buffer rounded once at the end (as the reference does).
    is_float32 = x.dtype == torch.float32
    rotated = out[..., :rotary_dim] if is_float32 else torch.empty_like(x_rot)
    x1, x2 = steps.rotary_pairs(x_rot, is_neox_style)
    out1, out2 = steps.rotary_pairs(rotated, is_neox_style)
    torch.mul(x1, cos, out=out1)
    out1.addcmul_(x2, sin, value=-1.0)
    torch.mul(x2, cos, out=out2)
    out2.addcmul_(x1, sin)
    if not is_float32:
        out[..., :rotary_dim] = rotated
    return out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:  # [T, 2*I] -> [T, I]
    """``silu(x[..., :I]) * x[..., I:]`` (SwiGLU), one temporary."""
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
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Write each token's key and value at its slot with ``index_copy_``, in place.

    Slots < 0 are skipped; the common batch without any is copied without masking. An
    FP8 cache gets ``x / scale`` saturated (:func:`kvplane.ops.steps.quantize_kv`),
    copied as bytes; a float cache ignores the scales.
    """
    flat_cache = steps.slot_view(kv_cache)  # [2, num_slots, num_kv_heads, head_size]
    if slot_mapping.numel() == 0:
        return
    if bool((slot_mapping < 0).any()):
        valid = slot_mapping >= 0
        key, value, slot_mapping = key[valid], value[valid], slot_mapping[valid]
    if steps.is_quantized_kv_cache(kv_cache.dtype):
        key = steps.quantize_kv(key, k_scale, kv_cache.dtype)
        value = steps.quantize_kv(value, v_scale, kv_cache.dtype)
    else:
        key, value = key.to(kv_cache.dtype), value.to(kv_cache.dtype)
    steps.byte_view(flat_cache[0]).index_copy_(0, slot_mapping, steps.byte_view(key))
    steps.byte_view(flat_cache[1]).index_copy_(0, slot_mapping, steps.byte_view(value))


def top_k_top_p_sample(
    probs: torch.Tensor,  # [num_seqs, vocab_size] float32, rows sum to 1
    top_k: torch.Tensor | None,  # [num_seqs] int64; <= 0 or >= vocab_size: no limit
    top_p: torch.Tensor | None,  # [num_seqs] float32; 1.0: no limit
    min_p: torch.Tensor | None,  # [num_seqs] float32; 0.0: no limit
    exponential_noise: torch.Tensor,  # [num_seqs, vocab_size] float32, Exp(1) samples
) -> torch.Tensor:  # [num_seqs] int64
    """Sample one token per row, exactly as the reference (same kept set, same race).

    With top-k alone, the k-th largest probability comes from ``torch.topk`` over the
    largest ``k`` in the batch instead of a full sort of the vocabulary; rows without a
    limit skip the filter. Top-p needs the sorted probabilities, computed once for both.
    """
    kept = probs
    if top_p is not None:
        sorted_probs, _ = probs.sort(dim=-1, descending=True)  # [num_seqs, vocab_size]
        if top_k is not None:
            kept = kept.masked_fill(probs < steps.top_k_floor(sorted_probs, top_k), 0.0)
        kept = kept.masked_fill(probs < steps.top_p_floor(sorted_probs, top_p), 0.0)
    elif top_k is not None:
        kth = _kth_largest(probs, top_k)
        if kth is not None:
            kept = kept.masked_fill(probs < kth, 0.0)
    if min_p is not None:
        kept = kept.masked_fill(probs < steps.min_p_floor(probs, min_p), 0.0)
    return steps.exponential_race(kept, exponential_noise)


def _kth_largest(
    probs: torch.Tensor,  # [num_seqs, vocab_size]
    top_k: torch.Tensor,  # [num_seqs] int64
) -> torch.Tensor | None:  # [num_seqs, 1]; 0 for rows without a limit; None: no row has one
    """Each row's ``top_k``-th largest probability, or 0 (which masks nothing)."""
    vocab_size = probs.shape[-1]
    limited = (top_k > 0) & (top_k < vocab_size)  # [num_seqs]
    if not bool(limited.any()):
        return None
    max_k = int(top_k[limited].max())
    top_values = probs.topk(max_k, dim=-1, sorted=True).values  # [num_seqs, max_k]
    index = (top_k.clamp(min=1, max=max_k) - 1).unsqueeze(1)  # [num_seqs, 1]
    kth = top_values.gather(1, index)
    return kth.masked_fill(~limited.unsqueeze(1), 0.0)


#: Ops the CPU leaves to :mod:`kvplane.ops.reference`, because the reference already is
#: what a CPU version would run: ``fused_moe`` groups tokens by expert and does one pair of
#: native-dtype matmuls per expert with tokens (no weight copies, no dense blow-up).
REFERENCE_OPS: frozenset[str] = frozenset({"fused_moe"})


def cpu_ops() -> dict[str, Callable[..., Any]]:
    """Every op of this module keyed by its stable name (each of
    :data:`kvplane.ops.OP_NAMES` but :data:`REFERENCE_OPS`)."""
    table: dict[str, Callable[..., Any]] = {
        "rms_norm": rms_norm,
        "fused_add_rms_norm": fused_add_rms_norm,
        "rotary_embedding": rotary_embedding,
        "silu_and_mul": silu_and_mul,
        "gelu_and_mul": gelu_and_mul,
        "reshape_and_cache": reshape_and_cache,
        "top_k_top_p_sample": top_k_top_p_sample,
    }
    return table
