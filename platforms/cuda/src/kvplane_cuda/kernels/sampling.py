"""Top-k / top-p / min-p sampling in Triton without sorting the vocabulary.

One program per row. Every filter of :func:`kvplane.ops.reference.top_k_top_p_sample`
keeps the tokens whose probability is at least some threshold, and each threshold is a
probability of the row, found by bisection on float32 bit patterns (non-negative floats
order like their int32 bits), one streaming pass over the row per step:

- top-k: the largest ``x`` with ``count(probs >= x) >= k`` is the k-th largest
  probability; ties at it are kept, as in the reference.
- top-p: the reference keeps sorted position ``j`` while ``cumsum[j] - sorted[j] < p``
  and then every probability at least the last kept one. Its cumsum runs on the CPU in
  float64, rounded to float32 per element; at the first sorted position of a value ``u``
  it equals ``sum(probs > u) + u``. The kernel evaluates exactly that expression (the sum
  in float64, then the same two float32 roundings) at ``u`` = the smallest probability
  ``>= x``, and looks for the smallest ``x`` where it is ``< p``.
- min-p: ``min_p * max(probs)``, as in the reference.

Each step also finds the nearest probabilities on both sides of the candidate and
jumps the bracket to them, so the search ends once no probability is left strictly
inside it: about 20 passes on a 150k vocabulary instead of 31. A final pass takes
``argmax(kept / noise)`` (IEEE division, first index on ties).

Exactness: the token equals the CPU reference's, top-p rounding included (e.g. the
tail tokens ``top_p=1.0`` drops because their float32 mass before rounds to 1.0). Only
summation order could still tell them apart at a top-p boundary: the kernel's float64
sum landing on the other side of a float32 rounding midpoint than the reference's
sequential float64 cumsum (both within ~1e-13 of it), or rounding that makes the
reference's mass-before sequence decrease by an ulp right at ``p`` (its count of kept
positions then differs from "the first position at or past ``p``"). Against the
reference run on a GPU, whose cumsum accumulates in float32, top-p boundaries can
differ whenever a mass before lies within float32 rounding error (~1e-7) of ``p``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: Vocabulary chunk per loop step: on a GPU, and in the interpreter (fewer, wider steps).
_BLOCK = 2048
_INTERPRETER_BLOCK = 16384


@triton.jit
def _bits(x):
    """The int32 bit pattern of a non-negative float32 (sign dropped: -0.0 is 0)."""
    return x.to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def _above_bits(below):
    """The smallest bit pattern above ``below``, the largest probability under a
    candidate; 0 when there is none (``below`` < 0)."""
    return tl.where(below < 0.0, 0, _bits(below) + 1)


@triton.jit
def _top_p_keeps(mass_at_or_above, smallest, num_smallest, max_prob, top_p):
    """Whether the reference's top-p keeps ``smallest``, a probability of the row.

    ``mass_at_or_above`` (float64) sums the probabilities ``>= smallest``, of which
    ``num_smallest`` equal it. The reference's inclusive cumsum at the first sorted
    position of ``smallest`` is everything above it plus itself, rounded to float32;
    its mass before is that minus ``smallest`` in float32. The top token is always kept.
    """
    smallest_f64 = smallest.to(tl.float64)
    inclusive = mass_at_or_above - num_smallest.to(tl.float64) * smallest_f64 + smallest_f64
    mass_before = inclusive.to(tl.float32) - smallest
    return (mass_before < top_p) | (smallest == max_prob)


@triton.jit
def _top_k_top_p_sample_kernel(
    probs_ptr,
    probs_row_stride,
    noise_ptr,
    noise_row_stride,
    top_k_ptr,
    top_p_ptr,
    min_p_ptr,
    out_ptr,
    vocab_size: tl.constexpr,
    HAS_TOP_K: tl.constexpr,
    HAS_TOP_P: tl.constexpr,
    HAS_MIN_P: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    probs_row = probs_ptr + row * probs_row_stride
    offsets = tl.arange(0, BLOCK)

    # Pass 1 (only with a filter): the max; for top-p also the min, how often it
    # occurs and the total mass. Without one, the race below is the only pass.
    max_prob = tl.full([], 1.0, tl.float32)
    if HAS_TOP_K or HAS_TOP_P or HAS_MIN_P:
        max_lanes = tl.full([BLOCK], -1.0, tl.float32)
        min_lanes = tl.full([BLOCK], float("inf"), tl.float32)
        min_counts = tl.zeros([BLOCK], tl.int32)
        mass_lanes = tl.zeros([BLOCK], tl.float64)
        for start in range(0, vocab_size, BLOCK):
            cols = start + offsets
            valid = cols < vocab_size
            probs = tl.load(probs_row + cols, mask=valid, other=0.0)
            max_lanes = tl.maximum(max_lanes, tl.where(valid, probs, -1.0))
            if HAS_TOP_P:
                candidate = tl.where(valid, probs, float("inf"))
                is_equal = valid & (candidate == min_lanes)
                min_counts = tl.where(
                    candidate < min_lanes, 1, tl.where(is_equal, min_counts + 1, min_counts)
                )
                min_lanes = tl.minimum(min_lanes, candidate)
                mass_lanes += tl.where(valid, probs.to(tl.float64), 0.0)
        max_prob = tl.max(max_lanes, axis=0)

    # Brackets (lo, hi] in bit patterns; a search is done once hi - lo <= 1.
    # top-k: count(probs >= lo) >= k > count(probs >= hi); the threshold is lo.
    k_lo = tl.full([], 0, tl.int32)
    k_hi = tl.full([], 1, tl.int32)
    if HAS_TOP_K:
        top_k = tl.load(top_k_ptr + row)
        is_limited = (top_k > 0) & (top_k < vocab_size)
        k_hi = tl.where(is_limited, _bits(max_prob) + 1, 1)
    # top-p: the reference drops lo's smallest probability and keeps hi's; threshold hi.
    p_lo = tl.full([], -1, tl.int32)
    p_hi = tl.full([], 0, tl.int32)
    if HAS_TOP_P:
        top_p = tl.load(top_p_ptr + row)
        min_prob = tl.min(min_lanes, axis=0)
        num_min = tl.sum(tl.where(min_lanes == min_prob, min_counts, 0), axis=0)
        keeps_all = _top_p_keeps(tl.sum(mass_lanes, axis=0), min_prob, num_min, max_prob, top_p)
        p_lo = tl.where(keeps_all, -1, _bits(min_prob))
        p_hi = tl.where(keeps_all, 0, _bits(max_prob))

    # Bisection: both searches share each pass over the row.
    while (k_hi - k_lo > 1) | (p_hi - p_lo > 1):
        k_x = (k_lo + (k_hi - k_lo) // 2).to(tl.float32, bitcast=True)
        # A finished top-p bracket (-1, 0] would give bit pattern -1 (a NaN): use 0.0.
        p_x = tl.maximum(p_lo + (p_hi - p_lo) // 2, 0).to(tl.float32, bitcast=True)
        k_counts = tl.zeros([BLOCK], tl.int32)
        k_above = tl.full([BLOCK], float("inf"), tl.float32)
        k_below = tl.full([BLOCK], -1.0, tl.float32)
        p_mass = tl.zeros([BLOCK], tl.float64)
        p_above = tl.full([BLOCK], float("inf"), tl.float32)
        p_above_counts = tl.zeros([BLOCK], tl.int32)
        p_below = tl.full([BLOCK], -1.0, tl.float32)
        for start in range(0, vocab_size, BLOCK):
            cols = start + offsets
            valid = cols < vocab_size
            probs = tl.load(probs_row + cols, mask=valid, other=0.0)
            if HAS_TOP_K:
                is_above = valid & (probs >= k_x)
                k_counts += is_above.to(tl.int32)
                k_above = tl.minimum(k_above, tl.where(is_above, probs, float("inf")))
                k_below = tl.maximum(k_below, tl.where(valid & (probs < k_x), probs, -1.0))
            if HAS_TOP_P:
                is_above = valid & (probs >= p_x)
                p_mass += tl.where(is_above, probs.to(tl.float64), 0.0)
                candidate = tl.where(is_above, probs, float("inf"))
                is_equal = is_above & (candidate == p_above)
                p_above_counts = tl.where(
                    candidate < p_above, 1, tl.where(is_equal, p_above_counts + 1, p_above_counts)
                )
                p_above = tl.minimum(p_above, candidate)
                p_below = tl.maximum(p_below, tl.where(valid & (probs < p_x), probs, -1.0))
        if HAS_TOP_K:
            # True at x: true up to the smallest probability >= x; false: from just above
            # the largest probability < x. Either way the bracket shrinks strictly.
            is_kept = tl.sum(k_counts, axis=0) >= top_k
            is_active = k_hi - k_lo > 1
            next_lo = tl.where(is_kept, _bits(tl.min(k_above, axis=0)), k_lo)
            next_hi = tl.where(is_kept, k_hi, _above_bits(tl.max(k_below, axis=0)))
            k_lo = tl.where(is_active, next_lo, k_lo)
            k_hi = tl.where(is_active, next_hi, k_hi)
        if HAS_TOP_P:
            smallest = tl.min(p_above, axis=0)
            num_smallest = tl.sum(tl.where(p_above == smallest, p_above_counts, 0), axis=0)
            mass = tl.sum(p_mass, axis=0)
            is_kept = _top_p_keeps(mass, smallest, num_smallest, max_prob, top_p)
            is_active = p_hi - p_lo > 1
            next_lo = tl.where(is_kept, p_lo, _bits(smallest))
            next_hi = tl.where(is_kept, _above_bits(tl.max(p_below, axis=0)), p_hi)
            p_lo = tl.where(is_active, next_lo, p_lo)
            p_hi = tl.where(is_active, next_hi, p_hi)

    # Final pass: argmax(kept / noise), the first index on ties.
    threshold = tl.maximum(k_lo.to(tl.float32, bitcast=True), p_hi.to(tl.float32, bitcast=True))
    if HAS_MIN_P:
        floor = tl.load(min_p_ptr + row) * max_prob
    noise_row = noise_ptr + row * noise_row_stride
    best = tl.full([], -1.0, tl.float32)
    best_index = tl.full([], 0, tl.int32)
    for start in range(0, vocab_size, BLOCK):
        cols = start + offsets
        valid = cols < vocab_size
        probs = tl.load(probs_row + cols, mask=valid, other=0.0)
        noise = tl.load(noise_row + cols, mask=valid, other=1.0)
        is_kept = probs >= threshold
        if HAS_MIN_P:
            is_kept = is_kept & (probs >= floor)
        scores = tl.where(is_kept, tl.math.div_rn(probs, noise), 0.0)
        scores = tl.where(valid, scores, -1.0)
        block_best = tl.max(scores, axis=0)
        block_index = tl.argmax(scores, axis=0, tie_break_left=True)
        is_better = block_best > best
        best_index = tl.where(is_better, start + block_index, best_index)
        best = tl.where(is_better, block_best, best)
    tl.store(out_ptr + row, best_index.to(tl.int64))


def top_k_top_p_sample(
    probs: torch.Tensor,  # [num_seqs, vocab_size] float32, rows sum to 1
    top_k: torch.Tensor | None,  # [num_seqs] int64; <= 0 or >= vocab_size: no limit
    top_p: torch.Tensor | None,  # [num_seqs] float32; 1.0: no limit
    min_p: torch.Tensor | None,  # [num_seqs] float32; 0.0: no limit
    exponential_noise: torch.Tensor,  # [num_seqs, vocab_size] float32, Exp(1) samples
) -> torch.Tensor:  # [num_seqs] int64
    """Sample one token per row from ``probs`` restricted by top-k, top-p and min-p.

    The token of :func:`kvplane.ops.reference.top_k_top_p_sample` (see the module
    docstring for where summation order could tell them apart); no sort, no host sync.
    """
    if probs.dtype != torch.float32 or exponential_noise.dtype != torch.float32:
        raise ValueError(
            f"top_k_top_p_sample takes float32 probs and noise, got {probs.dtype} "
            f"and {exponential_noise.dtype}"
        )
    num_seqs, vocab_size = probs.shape
    out = torch.empty(num_seqs, dtype=torch.int64, device=probs.device)
    if num_seqs == 0:
        return out
    if probs.stride(-1) != 1:
        probs = probs.contiguous()
    if exponential_noise.stride(-1) != 1:
        exponential_noise = exponential_noise.contiguous()
    max_block = _BLOCK if probs.is_cuda else _INTERPRETER_BLOCK
    block = min(triton.next_power_of_2(vocab_size), max_block)
    _top_k_top_p_sample_kernel[(num_seqs,)](
        probs,
        probs.stride(0),
        exponential_noise,
        exponential_noise.stride(0),
        probs if top_k is None else top_k.contiguous(),
        probs if top_p is None else top_p.contiguous(),
        probs if min_p is None else min_p.contiguous(),
        out,
        vocab_size,
        HAS_TOP_K=top_k is not None,
        HAS_TOP_P=top_p is not None,
        HAS_MIN_P=min_p is not None,
        BLOCK=block,
        num_warps=16,
    )
    return out
