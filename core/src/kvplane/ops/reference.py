"""Plain-torch reference implementations of every op platforms may override.

These define the semantics: a platform's op must return what these return (within
floating-point tolerance) for every input the conformance kit draws. They favour clarity
over speed, compute in float32 and return the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvplane.ops import steps


def rms_norm(
    x: torch.Tensor,  # [..., hidden_size], any strides
    weight: torch.Tensor,  # [hidden_size]
    eps: float,
) -> torch.Tensor:  # x's shape
    """``x / sqrt(mean(x**2) + eps) * weight`` over the last dim; never mutates its
    inputs. ``x`` may be a strided view, e.g. ``[tokens, heads, head_size]`` heads sliced
    from a fused QKV output (Qwen3's per-head norms), which implementations read in
    place where they can."""
    x_f32 = x.float()
    variance = x_f32.pow(2).mean(dim=-1, keepdim=True)
    normed = x_f32 * torch.rsqrt(variance + eps)
    return (normed * weight.float()).to(x.dtype)


def fused_add_rms_norm(
    x: torch.Tensor,  # [num_tokens, hidden_size]
    residual: torch.Tensor,  # [num_tokens, hidden_size]
    weight: torch.Tensor,  # [hidden_size]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(rms_norm(x + residual), x + residual)``.

    Implementations may write their results into ``x`` and ``residual``; callers must
    not reuse those inputs afterwards.
    """
    summed = steps.residual_sum(x, residual)
    return rms_norm(summed, weight, eps), summed


def rotary_embedding(
    positions: torch.Tensor,  # [num_tokens] int64
    query: torch.Tensor,  # [num_tokens, num_heads, head_size]
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
    cos_sin_cache: torch.Tensor,  # [max_position, rotary_dim] = cat(cos, sin) halves
    is_neox_style: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate the first ``rotary_dim`` channels of each head by its position's angles.

    Neox style rotates the two halves of the rotary channels against each other (Llama,
    Qwen, ...); GPT-J style rotates interleaved pairs. Channels past ``rotary_dim`` pass
    through. Returns the rotated tensors; implementations may rotate ``query`` and ``key``
    in place and return them (this reference returns new tensors), so callers must not
    reuse the unrotated inputs.
    """
    # cos and sin: [num_tokens, rotary_dim // 2] each.
    cos, sin = steps.cos_sin_halves(cos_sin_cache.index_select(0, positions))
    return (
        _rotate(query, cos, sin, is_neox_style),
        _rotate(key, cos, sin, is_neox_style),
    )


def _rotate(
    x: torch.Tensor,  # [num_tokens, num_heads, head_size]
    cos: torch.Tensor,  # [num_tokens, rotary_dim // 2]
    sin: torch.Tensor,  # [num_tokens, rotary_dim // 2]
    is_neox_style: bool,
) -> torch.Tensor:
    rotary_dim = cos.shape[-1] * 2
    x_rot = x[..., :rotary_dim].float()
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    x1, x2 = steps.rotary_pairs(x_rot, is_neox_style)
    out1 = x1 * cos - x2 * sin
    out2 = x2 * cos + x1 * sin
    if is_neox_style:
        rotated = torch.cat((out1, out2), dim=-1)
    else:
        rotated = torch.stack((out1, out2), dim=-1).flatten(-2)
    return torch.cat((rotated.to(x.dtype), x[..., rotary_dim:]), dim=-1)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:  # [T, 2*I] -> [T, I]
    """``silu(x[..., :I]) * x[..., I:]`` (SwiGLU)."""
    gate, up = x.chunk(2, dim=-1)
    return (F.silu(gate.float()) * up.float()).to(x.dtype)


def gelu_and_mul(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """``gelu(x[..., :I]) * x[..., I:]`` (GeGLU); ``approximate`` is "none" or "tanh"."""
    gate, up = x.chunk(2, dim=-1)
    return (F.gelu(gate.float(), approximate=approximate) * up.float()).to(x.dtype)


def reshape_and_cache(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_size]
    slot_mapping: torch.Tensor,  # [num_tokens] int64; slot = block * block_size + offset
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Write each token's key and value at its slot, in place. Slots < 0 are skipped.

    A float cache gets the values cast to its dtype (the scales are ignored); a
    quantized one (float8_e4m3fn, :func:`kvplane.ops.steps.is_quantized_kv_cache`)
    gets ``key / k_scale`` and ``value / v_scale`` saturated and rounded
    (:func:`kvplane.ops.steps.quantize_kv`; the scales since plugin API 1.5).
    """
    flat_cache = steps.slot_view(kv_cache)  # [2, num_slots, num_kv_heads, head_size]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    if steps.is_quantized_kv_cache(kv_cache.dtype):
        key = steps.quantize_kv(key[valid], k_scale, kv_cache.dtype)
        value = steps.quantize_kv(value[valid], v_scale, kv_cache.dtype)
    else:
        key, value = key[valid].to(kv_cache.dtype), value[valid].to(kv_cache.dtype)
    steps.byte_view(flat_cache[0]).index_copy_(0, slots, steps.byte_view(key))
    steps.byte_view(flat_cache[1]).index_copy_(0, slots, steps.byte_view(value))


def top_k_top_p_sample(
    probs: torch.Tensor,  # [num_seqs, vocab_size] float32, rows sum to 1
    top_k: torch.Tensor | None,  # [num_seqs] int64; <= 0 or >= vocab_size: no limit
    top_p: torch.Tensor | None,  # [num_seqs] float32; 1.0: no limit
    min_p: torch.Tensor | None,  # [num_seqs] float32; 0.0: no limit
    exponential_noise: torch.Tensor,  # [num_seqs, vocab_size] float32, Exp(1) samples
) -> torch.Tensor:  # [num_seqs] int64
    """Sample one token per row from ``probs`` restricted by top-k, top-p and min-p.

    Top-k keeps the ``k`` most probable tokens (ties at the k-th probability kept);
    top-p keeps the smallest set of most probable tokens whose mass reaches ``p``;
    min-p keeps tokens with probability at least ``min_p * max(probs)``. The draw is
    ``argmax(kept_probs / noise)`` (an exponential race, equivalent to sampling from the
    renormalised kept distribution), so the caller's noise alone fixes the outcome: equal
    noise rows give equal tokens whatever else is in the batch.
    """
    kept = probs.clone()
    if top_k is not None or top_p is not None:
        sorted_probs, _ = probs.sort(dim=-1, descending=True)  # [num_seqs, vocab_size]
        if top_k is not None:
            kept = kept.masked_fill(kept < steps.top_k_floor(sorted_probs, top_k), 0.0)
        if top_p is not None:
            kept = kept.masked_fill(probs < steps.top_p_floor(sorted_probs, top_p), 0.0)
    if min_p is not None:
        kept = kept.masked_fill(probs < steps.min_p_floor(probs, min_p), 0.0)
    return steps.exponential_race(kept, exponential_noise)


#: Activations ``fused_moe`` accepts (SwiGLU, exact GeGLU, tanh-approximated GeGLU).
MOE_ACTIVATIONS = ("silu", "gelu", "gelu_tanh")


def gated_activation(
    gate_up: torch.Tensor,  # [num_tokens, 2 * intermediate_size]: gate, then up
    activation: str,
) -> torch.Tensor:  # [num_tokens, intermediate_size]
    """``act(gate) * up`` for one of :data:`MOE_ACTIVATIONS`: :func:`silu_and_mul` or
    :func:`gelu_and_mul` (exact, or tanh-approximated for "gelu_tanh")."""
    if activation == "silu":
        return silu_and_mul(gate_up)
    if activation in ("gelu", "gelu_tanh"):
        return gelu_and_mul(gate_up, "tanh" if activation == "gelu_tanh" else "none")
    raise ValueError(f"unknown fused_moe activation {activation!r}; use one of {MOE_ACTIVATIONS}")


def fused_moe(
    hidden: torch.Tensor,  # [num_tokens, hidden_size]
    w13: torch.Tensor,  # [num_experts, 2 * intermediate_size, hidden_size]: gate rows, up rows
    w2: torch.Tensor,  # [num_experts, hidden_size, intermediate_size]
    topk_weights: torch.Tensor,  # [num_tokens, top_k] float32
    topk_ids: torch.Tensor,  # [num_tokens, top_k] int64, each in [0, num_experts)
    activation: str = "silu",
) -> torch.Tensor:  # [num_tokens, hidden_size]
    """Mixture of experts: ``sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(hidden[t])``.

    ``expert_e(x) = w2[e] @ (act(w13[e, :I] @ x) * (w13[e, I:] @ x))`` with ``act`` one of
    "silu" (SwiGLU), "gelu" (exact GeGLU) or "gelu_tanh". Each expert follows the dense
    MLP's rounding: its two matmuls run in the input dtype (float32 accumulation, as
    ``F.linear``) and the gated activation is :func:`silu_and_mul` / :func:`gelu_and_mul`;
    the weighted sum over the ``top_k`` experts accumulates in float32, expert by expert
    in id order (deterministic on every device), and rounds once.
    Routing (softmax, top-k, renormalisation) is the caller's. Never mutates its inputs.

    Tokens are grouped by expert and each expert with tokens runs one matmul pair over its
    rows (:func:`kvplane.ops.steps.sum_over_experts`). Reading the per-expert counts syncs
    with the device once.
    """
    if activation not in MOE_ACTIVATIONS:
        raise ValueError(
            f"unknown fused_moe activation {activation!r}; use one of {MOE_ACTIVATIONS}"
        )

    def expert_mlp(expert: int, rows: torch.Tensor) -> torch.Tensor:
        gate_up = F.linear(rows, w13[expert])  # [count, 2 * I]
        return F.linear(gated_activation(gate_up, activation), w2[expert])

    return steps.sum_over_experts(hidden, topk_weights, topk_ids, w13.shape[0], expert_mlp)
