"""Steps the reference ops are built from, public so that platform implementations reuse
them instead of copying them: the layouts (the cos/sin table's halves, the rotary
channel pairs, the cache's slot rows), the residual sum, the sampling thresholds, the
FP8 KV cache's quantization and the mixture-of-experts sum over each expert's tokens.

Each step computes what :mod:`kvplane.ops.reference` defines, in the same float32
arithmetic, so an implementation built from them rounds exactly as the reference does.
None mutates its inputs; several return views of them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def residual_sum(
    x: torch.Tensor,  # [num_tokens, hidden_size]
    residual: torch.Tensor,  # [num_tokens, hidden_size]
) -> torch.Tensor:  # [num_tokens, hidden_size], x.dtype
    """``x + residual`` added in float32 and rounded once to ``x``'s dtype."""
    return (x.float() + residual.float()).to(x.dtype)


def cos_sin_halves(
    cos_sin: torch.Tensor,  # [..., rotary_dim] rows of a cos_sin_cache: cat(cos, sin)
) -> tuple[torch.Tensor, torch.Tensor]:  # each [..., rotary_dim // 2] float32
    """The float32 ``cos`` and ``sin`` halves of rows of a ``cos_sin_cache`` (views of one
    float32 copy, or of ``cos_sin`` itself when it is float32)."""
    cos, sin = cos_sin.float().chunk(2, dim=-1)
    return cos, sin


def rotary_pairs(
    x: torch.Tensor,  # [..., rotary_dim]
    is_neox_style: bool,
) -> tuple[torch.Tensor, torch.Tensor]:  # each [..., rotary_dim // 2], views of x
    """The two sets of rotary channels that rotate against each other: the first and
    second halves (Neox style: Llama, Qwen, ...) or the even and odd channels (GPT-J)."""
    if is_neox_style:
        half = x.shape[-1] // 2
        return x[..., :half], x[..., half:]
    return x[..., 0::2], x[..., 1::2]


def slot_view(
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_size]
) -> torch.Tensor:  # [2, num_slots, num_kv_heads, head_size]
    """The cache with one row per slot (``slot = block * block_size + offset``), a view."""
    num_kv_heads, head_size = kv_cache.shape[-2:]
    return kv_cache.view(2, -1, num_kv_heads, head_size)


# -- quantized KV caches -----------------------------------------------------------------

#: Cache dtypes that hold ``x / scale`` with a per-tensor scale per layer and K / V.
QUANTIZED_KV_DTYPES: tuple[torch.dtype, ...] = (torch.float8_e4m3fn,)


def is_quantized_kv_cache(dtype: torch.dtype | None) -> bool:
    """Whether a KV cache of ``dtype`` is quantized: writers store ``x / scale`` and
    readers take ``stored * scale`` (:func:`quantize_kv`, :func:`dequantize_kv`)."""
    return dtype in QUANTIZED_KV_DTYPES


def quantize_kv(
    x: torch.Tensor,  # [num_tokens, num_kv_heads, head_size], any float dtype
    scale: float,
    dtype: torch.dtype,
) -> torch.Tensor:  # x's shape, dtype
    """``x / scale`` in float32 (IEEE division), saturated to ``dtype``'s finite range
    (+-448 for e4m3: a bare cast of a larger value gives NaN), rounded to the nearest
    ``dtype`` value, ties to even."""
    limit = torch.finfo(dtype).max
    # A 0-d tensor on x's device: dividing by a Python number on CUDA multiplies by its
    # reciprocal, which rounds differently from the division kernels compute.
    divisor = torch.full((), scale, dtype=torch.float32, device=x.device)
    return (x.float() / divisor).clamp_(-limit, limit).to(dtype)


def dequantize_kv(
    stored: torch.Tensor,  # [..., head_size], a quantized cache's values
    scale: float,
) -> torch.Tensor:  # stored's shape, float32
    """``stored * scale`` in float32: the keys or values a quantized cache holds."""
    return stored.float() * scale


def byte_view(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, or its bytes (a ``uint8`` view of the same shape) when it is a float8
    tensor: torch has no float8 ``index_copy_`` on the CPU, and copying bytes is exact."""
    if tensor.dtype.is_floating_point and tensor.element_size() == 1:
        return tensor.view(torch.uint8)
    return tensor


def top_k_floor(
    sorted_probs: torch.Tensor,  # [num_seqs, vocab_size], each row descending
    top_k: torch.Tensor,  # [num_seqs] int64; <= 0 or >= vocab_size: no limit
) -> torch.Tensor:  # [num_seqs, 1]
    """Each row's ``top_k``-th largest probability: top-k keeps the probabilities at
    least this (ties included); a row without a limit gets its smallest probability."""
    vocab_size = sorted_probs.shape[-1]
    k = torch.where((top_k <= 0) | (top_k >= vocab_size), vocab_size, top_k)
    return sorted_probs.gather(1, (k - 1).clamp(min=0).unsqueeze(1))


def top_p_floor(
    sorted_probs: torch.Tensor,  # [num_seqs, vocab_size], each row descending
    top_p: torch.Tensor,  # [num_seqs] float32; 1.0: no limit
) -> torch.Tensor:  # [num_seqs, 1]
    """Each row's smallest probability that top-p keeps: sorted position ``j`` is kept
    while the mass strictly before it is below ``p`` (the first always is)."""
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    keep_sorted = mass_before < top_p.unsqueeze(1)
    keep_sorted[:, 0] = True
    num_kept = keep_sorted.sum(dim=-1, keepdim=True)  # [num_seqs, 1]
    return sorted_probs.gather(1, num_kept - 1)


def min_p_floor(
    probs: torch.Tensor,  # [num_seqs, vocab_size]
    min_p: torch.Tensor,  # [num_seqs] float32; 0.0: no limit
) -> torch.Tensor:  # [num_seqs, 1]
    """``min_p * max(probs)`` per row: min-p keeps the probabilities at least this."""
    return min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values


def exponential_race(
    weights: torch.Tensor,  # [num_seqs, vocab_size] float32, non-negative
    exponential_noise: torch.Tensor,  # [num_seqs, vocab_size] float32, Exp(1) samples
) -> torch.Tensor:  # [num_seqs] int64
    """``argmax(weights / noise)`` per row: a draw from the row's weights renormalised,
    decided by the caller's noise alone (first index on ties)."""
    return (weights / exponential_noise).argmax(dim=-1)


# -- mixture of experts ------------------------------------------------------------------


def sum_over_experts(
    hidden: torch.Tensor,  # [num_tokens, hidden_size]
    topk_weights: torch.Tensor,  # [num_tokens, top_k] float32
    topk_ids: torch.Tensor,  # [num_tokens, top_k] int64, each in [0, num_experts)
    num_experts: int,
    expert_mlp: Callable[[int, torch.Tensor], torch.Tensor],
) -> torch.Tensor:  # [num_tokens, hidden_size], hidden.dtype
    """``sum_j topk_weights[t, j] * expert_mlp(topk_ids[t, j], hidden[t])``.

    Tokens are grouped by expert (one stable sort) and ``expert_mlp(e, rows)`` runs once
    per expert with tokens, on all of its rows (``[count, hidden_size]`` ->
    ``[count, hidden_size]``), so the work is ``num_tokens * top_k`` rows, never a dense
    ``[num_tokens, num_experts, ...]`` product. The weighted sum accumulates in float32,
    expert by expert in id order (deterministic on every device), and rounds once.
    Reading the per-expert counts syncs with the device once. Raises ValueError for
    expert ids ``>= num_experts`` (torch raises for negative ones).
    """
    num_tokens, top_k = topk_ids.shape
    out = torch.zeros(num_tokens, hidden.shape[-1], dtype=torch.float32, device=hidden.device)
    if num_tokens == 0:
        return out.to(hidden.dtype)
    flat_ids = topk_ids.reshape(-1)  # [num_tokens * top_k]
    counts = torch.bincount(flat_ids, minlength=num_experts).tolist()  # raises on ids < 0
    if len(counts) > num_experts:
        raise ValueError(f"topk_ids has expert ids >= num_experts ({num_experts})")
    order = flat_ids.argsort(stable=True)  # assignments grouped by expert
    token_ids = order // top_k  # [num_tokens * top_k]: the token of each sorted assignment
    weights = topk_weights.reshape(-1).float()[order]  # [num_tokens * top_k]
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        rows = token_ids[start : start + count]  # [count]
        expert_out = expert_mlp(expert, hidden.index_select(0, rows))  # [count, hidden_size]
        # Rows are distinct within one expert; index_put_ adds deterministically (and,
        # unlike index_add_, without a parallel region per row on the CPU).
        out.index_put_((rows,), expert_out.float() * weights[start : start + count, None], True)
        start += count
    return out.to(hidden.dtype)
