"""Triton paged attention over kvplane's cache ``[2, num_blocks, block_size, num_kv_heads, D]``.

Two paths, each launched with grids that depend only on tensor shapes and host upper
bounds (``max_query_len``, ``max_seq_len``), so both are CUDA-graph capturable (this
module holds the first and the pieces both share; :mod:`.decode_attention` the second):

- :func:`unified_attention` serves any batch (prefill chunks with cached context and
  decodes together) in one launch. A program owns one *query tile* of one sequence and
  one KV head. Its M rows pack ``group_size`` query heads times ``block_q`` tokens (row
  ``m`` = token ``m // group_size``, head ``m % group_size``), so each K/V tile is loaded
  once for the whole GQA group. Sequence ``i`` owns the tiles from
  ``query_start_loc[i] // block_q + i`` on (at least ``ceil(query_len / block_q)`` of
  them), so a program finds its sequence by binary search over ``query_start_loc`` on the
  device and the grid is ``num_tokens // block_q + num_seqs`` tiles; spare tiles exit.
- :func:`decode_attention` serves batches of one new token per sequence with split-KV:
  grid ``(num_kv_heads, num_seqs, num_splits)``; each program attends the group's query
  heads (padded to 16 rows for ``tl.dot``) over one partition of the visible context,
  computed on the device from the real ``seq_len`` (partitions may be empty), and writes
  a float32 partial output plus its log-sum-exp. The same launch merges them: each
  program then increments its (sequence, KV head) counter in a per-device buffer, and
  the last to arrive merges the group's partitions, writes the output rows and resets
  the counter to 0 (a separate reduce kernel when a CUDA-graph capture would have to
  grow the buffer). With one split the program writes the output directly.

Keys are gathered ``block_n`` at a time (several KV blocks per tile) through the block
table. Softmax runs online in float32 in base 2; float32 inputs use exact ``ieee`` dots.
Masked loads return 0 for every slot a query may not see, so stale or NaN cache content
outside the sequences is never read into a result.

An FP8 (float8_e4m3fn) cache is read as stored: each tile converts exactly to the query
dtype for ``tl.dot`` (every e4m3 value is a float16 and a bfloat16 value), and the
dequantization ``stored * scale`` is folded into the float32 arithmetic: ``k_scale``
into the softmax scale on the host (``q . (k * s) = (q . k) * s``), ``v_scale`` into the
output once (``sum p (v * s) = s * sum p v``), under the constexpr ``KV_FP8`` so that a
float cache compiles exactly as without FP8 support.
"""

from __future__ import annotations

import contextlib
import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kvplane.ops import steps

LOG2E = tl.constexpr(1.4426950408889634)
#: Rows of a ``tl.dot``: its M dimension must be at least 16.
MIN_DOT_ROWS = 16

# fmt: off
# (Kernels keep Triton's usual dense argument lists.)


@triton.jit
def soft_cap(scores, cap):
    # cap * tanh(scores / cap), with tanh from exp2 (the interpreter has no tanh); the
    # absolute error, about 1e-7 * cap, is far below float32 attention tolerances.
    x = scores / cap
    t = tl.exp2(-2.0 * LOG2E * tl.abs(x))
    magnitude = (1.0 - t) / (1.0 + t)
    return cap * tl.where(x < 0, -magnitude, magnitude)


@triton.jit
def table_block_ids(table_row_ptr, positions, end, BLOCK_SIZE: tl.constexpr):
    # Ids of the blocks holding ``positions`` of one sequence (0 from ``end`` on).
    return tl.load(table_row_ptr + positions // BLOCK_SIZE, mask=positions < end, other=0)


@triton.jit
def start_kv_loop(block_tables_ptr, seq, stride_table, begin, end, ROWS: tl.constexpr,
                  HEAD_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    # What a loop over the keys [begin, end) of sequence ``seq`` starts from: its
    # block-table row, the first tile's block ids (carried a tile ahead, see
    # gather_kv_tile) and an empty online softmax for ROWS query rows (running maximum
    # -inf, running sum 0, accumulator [ROWS, HEAD_PAD] 0).
    table_row_ptr = block_tables_ptr + seq.to(tl.int64) * stride_table
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, HEAD_PAD], tl.float32)
    block_ids = table_block_ids(table_row_ptr, begin + tl.arange(0, BLOCK_N), end, BLOCK_SIZE)
    return table_row_ptr, block_ids, m_i, l_i, acc


@triton.jit
def gather_kv_tile(key_cache_ptr, value_cache_ptr, table_row_ptr, block_ids, key_pos, key_valid,
                   end, kv_head, offs_d, d_mask, stride_block, stride_slot, stride_head,
                   BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    # Keys and values [N, HEAD_PAD] at ``key_pos`` of one sequence, from ``block_ids``
    # (this tile's, loaded one tile earlier), and the next tile's block ids for the next
    # call. The attention loops carry the ids because Triton's software pipeliner gives
    # each link of a dependent chain its own stage: gathered in the iteration that uses
    # them, the id load and the key/value copies would take two stages and keep one tile
    # in flight whatever ``num_stages``; carried, the copies run ``num_stages - 1`` tiles
    # ahead.
    next_ids = table_block_ids(table_row_ptr, key_pos + BLOCK_N, end, BLOCK_SIZE)
    rows = (block_ids.to(tl.int64) * stride_block + (key_pos % BLOCK_SIZE) * stride_slot
            + kv_head * stride_head)  # [N]
    offsets = rows[:, None] + offs_d[None, :]
    mask = key_valid[:, None] & d_mask[None, :]
    k = tl.load(key_cache_ptr + offsets, mask=mask, other=0.0)
    v = tl.load(value_cache_ptr + offsets, mask=mask, other=0.0)
    return k, v, next_ids


@triton.jit
def attend_tile(q, k, v, allowed, m_i, l_i, acc, sm_scale, softcap,
                 HAS_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr):
    # One online-softmax step over a key tile; scores in base 2. Rows that see no key
    # yet keep m = -inf: subtracting 0 instead keeps exp2 at 0 rather than NaN.
    k = k.to(q.dtype)  # a cache dtype other than the query's
    v = v.to(q.dtype)
    scores = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # [M, N]
    if HAS_SOFTCAP:
        scores = soft_cap(scores * sm_scale, softcap) * LOG2E
    else:
        scores = scores * (sm_scale * LOG2E)
    scores = tl.where(allowed, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(scores - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
    return m_new, l_i, acc


# Arguments that change from step to step: Triton would compile a variant per value class
# (1, a multiple of 16, other), each at its first use, in the middle of serving.
@triton.jit(do_not_specialize=["num_seqs", "num_search_steps", "stride_table"])
def _unified_kernel(
    out_ptr, query_ptr, key_cache_ptr, value_cache_ptr,
    block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    num_seqs, num_search_steps, sm_scale, softcap, window,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_block, stride_slot, stride_head, stride_table, v_scale,
    GROUP_SIZE: tl.constexpr, HEAD_SIZE: tl.constexpr, HEAD_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    PRECISION: tl.constexpr, KV_FP8: tl.constexpr,
):
    # Last tiles first: a sequence's later tiles see more keys (causal), so starting them
    # early shortens the tail of a long prefill.
    tile = tl.num_programs(0) - 1 - tl.program_id(0)
    kv_head = tl.program_id(1)
    # The sequence owning this tile: the last one whose first tile is <= ``tile``.
    lo = tl.full([], 0, tl.int32)
    hi = tl.full([], 0, tl.int32) + num_seqs
    for _ in range(num_search_steps):
        mid = (lo + hi) // 2
        is_left = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid <= tile
        lo = tl.where(is_left, mid + 1, lo)
        hi = tl.where(is_left, hi, mid)
    seq = lo - 1
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    first_token = (tile - (q_start // BLOCK_Q + seq)) * BLOCK_Q  # in the sequence's queries
    if first_token >= q_len:
        return
    context_len = tl.load(seq_lens_ptr + seq) - q_len

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_PAD)
    d_mask = offs_d < HEAD_SIZE
    token_in_tile = offs_m // GROUP_SIZE
    row_valid = (token_in_tile < BLOCK_Q) & (first_token + token_in_tile < q_len)
    query_pos = context_len + first_token + token_in_tile  # [M]
    tokens = (q_start + first_token + token_in_tile).to(tl.int64)  # [M]
    heads = kv_head * GROUP_SIZE + offs_m % GROUP_SIZE  # [M]
    row_mask = row_valid[:, None] & d_mask[None, :]
    q = tl.load(query_ptr + tokens[:, None] * stride_qt + heads[:, None] * stride_qh
                + offs_d[None, :], mask=row_mask, other=0.0)  # [M, HEAD_PAD]

    # Keys up to the tile's last query (causal); from the first query's window start.
    kv_end = context_len + tl.minimum(first_token + BLOCK_Q, q_len)
    kv_begin = 0
    if HAS_WINDOW:
        kv_begin = tl.maximum(context_len + first_token - window + 1, 0) // BLOCK_N * BLOCK_N
    table_row_ptr, block_ids, m_i, l_i, acc = start_kv_loop(
        block_tables_ptr, seq, stride_table, kv_begin, kv_end, BLOCK_M, HEAD_PAD, BLOCK_N,
        BLOCK_SIZE)
    for start in range(kv_begin, kv_end, BLOCK_N):
        key_pos = start + tl.arange(0, BLOCK_N)  # [N]
        key_valid = key_pos < kv_end
        k, v, block_ids = gather_kv_tile(key_cache_ptr, value_cache_ptr, table_row_ptr, block_ids,
                                         key_pos, key_valid, kv_end, kv_head, offs_d, d_mask,
                                         stride_block, stride_slot, stride_head, BLOCK_N,
                                         BLOCK_SIZE)
        allowed = key_valid[None, :] & (key_pos[None, :] <= query_pos[:, None])
        if HAS_WINDOW:
            allowed = allowed & (key_pos[None, :] > query_pos[:, None] - window)
        m_i, l_i, acc = attend_tile(q, k, v, allowed, m_i, l_i, acc, sm_scale, softcap,
                                     HAS_SOFTCAP, PRECISION)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    if KV_FP8:
        out = out * v_scale  # the values' dequantization, once for the weighted sum
    tl.store(out_ptr + tokens[:, None] * stride_ot + heads[:, None] * stride_oh
             + offs_d[None, :], out.to(out_ptr.dtype.element_ty), mask=row_mask)


# fmt: on


# --------------------------------------------------------------------------------------
# Launch configuration (host side; depends only on shapes and host upper bounds)
# --------------------------------------------------------------------------------------


class Tile(NamedTuple):
    """Launch shape of one kernel: rows per ``tl.dot``, keys per tile, warps, stages."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def padded_head_size(head_size: int) -> int:
    return max(16, triton.next_power_of_2(head_size))


def unified_tile(head_size: int, group_size: int, max_query_len: int, element_size: int) -> Tile:
    """The tile of :func:`unified_attention`; ``block_q = block_m // group_size`` tokens.

    16-bit: up to 128 rows x 64 keys (head <= 128) with 3 stages, the flash-attention
    shape that Hopper runs on wgmma; with the block ids carried a tile ahead, 3 stages
    keep two K/V tiles in flight (128 KiB shared memory, no spills). 2 stages keep only
    one tile in flight; 64-row tiles load each key tile for half as many queries. Head
    256 halves rows and keys so the tiles still fit shared memory (untuned). float32
    dots run on FMA units, whose operands live in registers: 32 rows x 16 keys avoids
    spills. Rows shrink with ``max_query_len`` (at least 16, the smallest ``tl.dot``, and
    at least the group) so decode-heavy batches waste fewer of them.
    """
    head_pad = padded_head_size(head_size)
    if element_size <= 2:
        max_rows, block_n, num_stages = (128, 64, 3) if head_pad <= 128 else (64, 32, 2)
    else:
        max_rows, block_n, num_stages = 32, 16, 2
    rows = triton.next_power_of_2(max(1, max_query_len) * group_size)
    block_m = max(MIN_DOT_ROWS, triton.next_power_of_2(group_size), min(rows, max_rows))
    num_warps = 8 if block_m * head_pad >= 128 * 128 or element_size > 2 else 4
    return Tile(block_m, block_n, num_warps, num_stages)


@functools.cache
def _cuda_sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; a small pretend GPU under the interpreter."""
    if device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_sm_count(index)


def on_device(device: torch.device) -> contextlib.AbstractContextManager[object]:
    # Triton launches on the current device: make it the tensors' one.
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def cache_strides(kv_cache: torch.Tensor, block_tables: torch.Tensor) -> tuple[int, int, int, int]:
    assert kv_cache.stride(-1) == 1, "the cache's head dimension must be contiguous"
    return kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3), block_tables.stride(0)


def dot_precision(dtype: torch.dtype) -> str:
    # Exact float32 dots (no TF32) so float32 results track the reference closely.
    return "ieee" if dtype == torch.float32 else "tf32"


def kv_scales(
    kv_cache: torch.Tensor, scale: float, k_scale: float, v_scale: float
) -> tuple[float, float, bool]:
    """``(softmax scale, value scale, KV_FP8)`` of a launch: an FP8 cache folds
    ``k_scale`` into the softmax scale and has the kernel apply ``v_scale``; a float
    cache keeps ``scale`` as it is and ignores both."""
    if steps.is_quantized_kv_cache(kv_cache.dtype):
        return scale * k_scale, float(v_scale), True
    return scale, 1.0, False


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------


def unified_attention(
    out: torch.Tensor,  # [num_tokens, num_heads, head_size], written
    query: torch.Tensor,  # [num_tokens, num_heads, head_size]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_size]
    block_tables: torch.Tensor,  # [num_seqs, max_num_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    max_query_len: int,  # an upper bound is fine
    scale: float,
    sliding_window: int | None = None,
    logit_softcap: float | None = None,
    *,
    k_scale: float = 1.0,  # an FP8 cache's key and value scales (ignored otherwise)
    v_scale: float = 1.0,
    tile: Tile | None = None,  # None: unified_tile (benchmarks sweep others)
) -> None:
    """Causal attention of every sequence's new tokens over its cache, one launch."""
    num_tokens, num_heads, head_size = query.shape
    num_seqs = seq_lens.shape[0]
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    group_size = num_heads // num_kv_heads
    if tile is None:
        tile = unified_tile(head_size, group_size, max_query_len, query.element_size())
    block_q = tile.block_m // group_size
    grid = (num_tokens // block_q + num_seqs, num_kv_heads)
    sm_scale, value_scale, kv_fp8 = kv_scales(kv_cache, scale, k_scale, v_scale)
    with on_device(query.device):
        _unified_kernel[grid](
            out, query, kv_cache[0], kv_cache[1], block_tables, seq_lens, query_start_loc,
            num_seqs, num_seqs.bit_length(), sm_scale, logit_softcap or 0.0,
            sliding_window or 0, query.stride(0), query.stride(1), out.stride(0), out.stride(1),
            *cache_strides(kv_cache, block_tables), value_scale,
            GROUP_SIZE=group_size, HEAD_SIZE=head_size,
            HEAD_PAD=padded_head_size(head_size), BLOCK_SIZE=block_size,
            BLOCK_M=tile.block_m, BLOCK_Q=block_q, BLOCK_N=tile.block_n,
            HAS_WINDOW=sliding_window is not None, HAS_SOFTCAP=logit_softcap is not None,
            PRECISION=dot_precision(query.dtype), KV_FP8=kv_fp8, num_warps=tile.num_warps,
            num_stages=tile.num_stages,
        )  # fmt: skip
