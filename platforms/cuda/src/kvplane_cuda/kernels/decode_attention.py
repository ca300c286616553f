"""Split-KV decode attention: one new token per sequence, the context split across programs.

See :mod:`.paged_attention` for the cache layout and the shared tile helpers. Grid
``(num_seqs, num_kv_heads, num_splits)``: each program attends the group's query heads
(padded to 16 rows for ``tl.dot``) over one partition of the visible context, computed on
the device from the real ``seq_len`` (partitions may be empty), and writes a float32
partial output plus its log-sum-exp; a reduce kernel merges the partitions. With one
split the partition kernel writes the output directly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvplane_cuda.kernels.paged_attention import (
    MIN_DOT_ROWS,
    Tile,
    attend_tile,
    cache_rows,
    cache_strides,
    dot_precision,
    num_sms,
    on_device,
    padded_head_size,
)

#: Decode launches aim for this many programs per SM, so that small batches keep enough
#: loads in flight. Measured on an H200 (benchmarks/gpu_suite.py, split sweep,
#: 2026-11-30), 8 KV heads: batch 32 peaks at ~2,000 programs (8 splits, 94-103% of copy
#: bandwidth at 8k-32k keys) and falls off past 4,000.
PROGRAMS_PER_SM = 16
#: Shortest decode partition (four 64-key tiles): at batch 1 shorter ones cost more in
#: per-program set-up and partial outputs than they gain (8k keys: 32 splits 1.26 TB/s,
#: 128 splits 1.07 TB/s).
MIN_KEYS_PER_SPLIT = 256
#: Upper bound on decode partitions (batch 1 at 32k keys: 64 splits 2.42 TB/s, 128 splits
#: 2.16 TB/s, 256 splits 1.82 TB/s).
MAX_SPLITS = 64


@triton.jit
def _decode_split_kernel(
    out_ptr,
    partial_out_ptr,
    partial_lse_ptr,
    query_ptr,
    key_cache_ptr,
    value_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    sm_scale,
    softcap,
    window,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_block,
    stride_slot,
    stride_head,
    stride_table,
    GROUP_SIZE: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if q_len == 0:  # a sequence without a new token has no output row
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    kv_begin = 0
    if HAS_WINDOW:
        kv_begin = tl.maximum(seq_len - window, 0)
    # Whole BLOCK_N tiles, aligned so a tile never straddles more blocks than it must.
    tiles_begin = kv_begin // BLOCK_N * BLOCK_N
    tiles_per_split = tl.cdiv(tl.cdiv(seq_len - tiles_begin, BLOCK_N), NUM_SPLITS)
    split_begin = tiles_begin + split * tiles_per_split * BLOCK_N
    split_end = tl.minimum(split_begin + tiles_per_split * BLOCK_N, seq_len)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_PAD)
    d_mask = offs_d < HEAD_SIZE
    heads = kv_head * GROUP_SIZE + offs_g  # [G]
    row_mask = (offs_g < GROUP_SIZE)[:, None] & d_mask[None, :]
    token = (q_start + q_len - 1).to(tl.int64)
    q = tl.load(
        query_ptr + token * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
        mask=row_mask,
        other=0.0,
    )  # [G, HEAD_PAD]

    table_row_ptr = block_tables_ptr + seq.to(tl.int64) * stride_table
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_PAD], tl.float32)
    for start in range(split_begin, split_end, BLOCK_N):
        key_pos = start + tl.arange(0, BLOCK_N)  # [N]
        key_valid = (key_pos < split_end) & (key_pos >= kv_begin)
        rows = cache_rows(
            table_row_ptr,
            key_pos,
            key_valid,
            kv_head,
            stride_block,
            stride_slot,
            stride_head,
            BLOCK_SIZE,
        )
        kv_offsets = rows[:, None] + offs_d[None, :]
        kv_mask = key_valid[:, None] & d_mask[None, :]
        k = tl.load(key_cache_ptr + kv_offsets, mask=kv_mask, other=0.0).to(q.dtype)
        v = tl.load(value_cache_ptr + kv_offsets, mask=kv_mask, other=0.0).to(q.dtype)
        m_i, l_i, acc = attend_tile(
            q, k, v, key_valid[None, :], m_i, l_i, acc, sm_scale, softcap, HAS_SOFTCAP, PRECISION
        )
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    if NUM_SPLITS == 1:
        tl.store(
            out_ptr + token * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=row_mask,
        )
    else:
        # An empty partition stores lse -inf and zeros: the reduce gives it no weight.
        lse = tl.where(l_i > 0.0, m_i + tl.log2(tl.where(l_i > 0.0, l_i, 1.0)), float("-inf"))
        num_heads = tl.num_programs(1) * GROUP_SIZE
        parts = (seq.to(tl.int64) * num_heads + heads) * NUM_SPLITS + split  # [G]
        tl.store(partial_lse_ptr + parts, lse, mask=offs_g < GROUP_SIZE)
        tl.store(partial_out_ptr + parts[:, None] * HEAD_SIZE + offs_d[None, :], out, mask=row_mask)


@triton.jit
def _decode_reduce_kernel(
    out_ptr,
    partial_out_ptr,
    partial_lse_ptr,
    query_start_loc_ptr,
    stride_ot,
    stride_oh,
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLIT_PAD: tl.constexpr,
    SPLIT_CHUNK: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if q_len == 0:
        return
    base = (seq.to(tl.int64) * tl.num_programs(1) + head) * NUM_SPLITS
    offs_s = tl.arange(0, SPLIT_PAD)
    lse = tl.load(partial_lse_ptr + base + offs_s, mask=offs_s < NUM_SPLITS, other=float("-inf"))
    lse_max = tl.max(lse, axis=0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    total = tl.sum(tl.exp2(lse - lse_max), axis=0)
    offs_d = tl.arange(0, HEAD_PAD)
    d_mask = offs_d < HEAD_SIZE
    acc = tl.zeros([HEAD_PAD], tl.float32)
    for first in range(0, NUM_SPLITS, SPLIT_CHUNK):  # chunks bound the registers per program
        splits = first + tl.arange(0, SPLIT_CHUNK)
        s_mask = splits < NUM_SPLITS
        weights = tl.exp2(
            tl.load(partial_lse_ptr + base + splits, mask=s_mask, other=float("-inf")) - lse_max
        )
        parts = tl.load(
            partial_out_ptr + (base + splits)[:, None] * HEAD_SIZE + offs_d[None, :],
            mask=s_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        acc += tl.sum(parts * weights[:, None], axis=0)
    out = acc / tl.where(total == 0.0, 1.0, total)
    token = (q_start + q_len - 1).to(tl.int64)
    tl.store(
        out_ptr + token * stride_ot + head * stride_oh + offs_d,
        out.to(out_ptr.dtype.element_ty),
        mask=d_mask,
    )


# fmt: on


def decode_tile(head_size: int, group_size: int, element_size: int) -> Tile:
    """The tile of :func:`decode_attention`: the group padded to 16 rows, 64 keys (8+
    KV blocks of 16 per load), 3 stages = one shared K/V buffer plus the block ids
    prefetched (~39 KiB, ~126 registers: 4 programs per Hopper SM, ~128 KiB of loads in
    flight per SM). float32 (FMA dots) takes 8 warps and fewer keys to avoid spills."""
    head_pad = padded_head_size(head_size)
    block_m = max(MIN_DOT_ROWS, triton.next_power_of_2(group_size))
    if element_size <= 2:
        return Tile(block_m, 64, 4, 3) if head_pad <= 128 else Tile(block_m, 32, 4, 2)
    return Tile(block_m, 32 if head_pad <= 128 else 16, 8, 2)


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_visible_len: int, num_sms: int) -> int:
    """Decode partitions per (sequence, KV head): enough programs for ``PROGRAMS_PER_SM``
    per SM, but no partition shorter than ``MIN_KEYS_PER_SPLIT`` keys of the longest
    visible context (``max_visible_len`` may be an upper bound, e.g. under CUDA graphs)."""
    wanted = triton.cdiv(num_sms * PROGRAMS_PER_SM, max(1, num_seqs * num_kv_heads))
    useful = triton.cdiv(max(1, max_visible_len), MIN_KEYS_PER_SPLIT)
    return max(1, min(wanted, useful, MAX_SPLITS))


def decode_attention(
    out: torch.Tensor,  # [num_tokens, num_heads, head_size], written
    query: torch.Tensor,  # [num_tokens, num_heads, head_size]; at most 1 token a sequence
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_size]
    block_tables: torch.Tensor,  # [num_seqs, max_num_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    max_seq_len: int,  # an upper bound is fine
    scale: float,
    sliding_window: int | None = None,
    logit_softcap: float | None = None,
    num_splits: int | None = None,  # None: choose_num_splits
) -> None:
    """Split-KV attention of each sequence's single new token over its whole context."""
    _, num_heads, head_size = query.shape
    num_seqs = seq_lens.shape[0]
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    group_size = num_heads // num_kv_heads
    head_pad = padded_head_size(head_size)
    tile = decode_tile(head_size, group_size, query.element_size())
    if num_splits is None:
        visible = max_seq_len if sliding_window is None else min(max_seq_len, sliding_window)
        num_splits = choose_num_splits(num_seqs, num_kv_heads, visible, num_sms(query.device))
    partial_out = partial_lse = out  # unused with one split: the kernel writes ``out``
    if num_splits > 1:
        partial_out = torch.empty(
            (num_seqs, num_heads, num_splits, head_size), dtype=torch.float32, device=out.device
        )
        partial_lse = torch.empty(
            (num_seqs, num_heads, num_splits), dtype=torch.float32, device=out.device
        )
    with on_device(query.device):
        _decode_split_kernel[(num_seqs, num_kv_heads, num_splits)](
            out, partial_out, partial_lse, query, kv_cache[0], kv_cache[1], block_tables,
            seq_lens, query_start_loc, scale, logit_softcap or 0.0, sliding_window or 0,
            query.stride(0), query.stride(1), out.stride(0), out.stride(1),
            *cache_strides(kv_cache, block_tables),
            GROUP_SIZE=group_size, GROUP_PAD=tile.block_m, HEAD_SIZE=head_size,
            HEAD_PAD=head_pad, BLOCK_SIZE=block_size, BLOCK_N=tile.block_n,
            NUM_SPLITS=num_splits, HAS_WINDOW=sliding_window is not None,
            HAS_SOFTCAP=logit_softcap is not None, PRECISION=dot_precision(query.dtype),
            num_warps=tile.num_warps, num_stages=tile.num_stages,
        )  # fmt: skip
        if num_splits > 1:
            split_pad = triton.next_power_of_2(num_splits)
            _decode_reduce_kernel[(num_seqs, num_heads)](
                out, partial_out, partial_lse, query_start_loc, out.stride(0), out.stride(1),
                HEAD_SIZE=head_size, HEAD_PAD=head_pad, NUM_SPLITS=num_splits,
                SPLIT_PAD=split_pad, SPLIT_CHUNK=min(split_pad, 16), num_warps=4,
            )  # fmt: skip
