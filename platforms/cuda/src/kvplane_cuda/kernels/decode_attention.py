"""Split-KV decode attention: one new token per sequence, the context split across programs.

See :mod:`.paged_attention` for the cache layout and the shared tile helpers. Grid
``(num_kv_heads, num_seqs, num_splits)``: the KV heads of one sequence run in consecutive
programs, so the slots' rows (every KV head of a token side by side) are read together
while they are open in DRAM. Each program attends the group's query heads
(padded to 16 rows for ``tl.dot``) over one partition of the visible context, computed on
the device from the real ``seq_len`` (partitions may be empty), and writes a float32
partial output plus its log-sum-exp. With one split the program writes the output
directly.

The partitions are merged in the same launch ("last program reduces"): after its partial
stores a program increments its (sequence, KV head) counter, an int32 in a per-device
buffer (acquire-release, GPU scope, after a CTA barrier); the program that arrives last
reads every partition of the group's heads, writes their output rows and resets the
counter to 0, so the buffer is clean for the next launch and for CUDA-graph replays. This
saves the second launch, and each group's merge starts as soon as its own partitions are
done. The counters assume that decode launches on one device do not overlap (one stream,
or streams ordered by events). When a CUDA-graph capture would have to allocate or grow
the counter buffer, the launch merges in a separate reduce kernel instead, as it always
does with ``fused_reduce=False`` (benchmarks compare the two).

The launch's dependent global loads are kept short: ``query_start_loc`` and ``seq_len``
are read together before any branch, a sequence without a new token is masked (it
attends nothing and touches no counter) rather than branched on, and the query row and
the first block ids only wait for those three values.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvplane_cuda.kernels.paged_attention import (
    MIN_DOT_ROWS,
    Tile,
    attend_tile,
    cache_strides,
    dot_precision,
    gather_kv_tile,
    kv_scales,
    num_sms,
    on_device,
    padded_head_size,
    start_kv_loop,
)

#: Decode launches aim for this many programs per SM: small batches need the splits to keep
#: enough key/value loads in flight, while many more programs than that only add fixed
#: per-program cost and partitions to merge.
PROGRAMS_PER_SM = 16
#: Shortest decode partition: one 64-key tile (the tile of :func:`decode_tile`). A longer
#: minimum gives short contexts fewer splits and leaves SMs idle; a shorter one would give
#: a program less than a tile to stream for the same set-up and merge cost.
MIN_KEYS_PER_SPLIT = 64
#: Upper bound on decode partitions: past it the merge (the last program loads every
#: partial) and each program's fixed cost outweigh the extra SMs kept busy.
MAX_SPLITS = 32
#: Partial-output elements a merging program loads per step (32 float32 registers a
#: thread at 4 warps), so its registers stay bounded whatever the split count. The
#: kernel's register count is the maximum over attention and merge: a wider merge tile
#: would cost the attention part programs per SM to save a round trip in the merge.
MERGE_TILE_ELEMENTS = 4096
#: Arrival counters allocated per device on first use, one per (sequence, KV head): 64Ki
#: serve e.g. 8,192 sequences of 8 KV heads before the buffer must grow.
COUNTER_SLOTS = 1 << 16

# fmt: off
# (Kernels keep Triton's usual dense argument lists.)


@triton.jit
def _merge_partials(out_ptr, partial_out_ptr, partial_lse_ptr, seq, first_head, num_heads, token,
                    stride_ot, stride_oh, NUM_ROWS: tl.constexpr, ROWS: tl.constexpr,
                    HEAD_SIZE: tl.constexpr, HEAD_PAD: tl.constexpr, NUM_SPLITS: tl.constexpr,
                    SPLIT_CHUNK: tl.constexpr):
    # Output rows of heads ``first_head + [0, NUM_ROWS)`` of ``token``: the partial outputs
    # weighted by their share of the softmax mass (base-2 log-sum-exps), merged chunk by
    # chunk with a running maximum, so each chunk's log-sum-exps and outputs are loaded
    # together (one round trip a chunk; most merges are one chunk). Partitions with lse
    # -inf (empty) weigh 0; a row whose partitions are all empty comes out 0. Loads are
    # ``.cg`` (L2 only): the partials come from other SMs, and the L1 must not serve stale
    # lines of them.
    offs_r = tl.arange(0, ROWS)
    offs_d = tl.arange(0, HEAD_PAD)
    r_mask = offs_r < NUM_ROWS
    d_mask = offs_d < HEAD_SIZE
    heads = first_head + offs_r  # [R]
    base = (seq.to(tl.int64) * num_heads + heads) * NUM_SPLITS  # [R]
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    total = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, HEAD_PAD], tl.float32)
    for first in range(0, NUM_SPLITS, SPLIT_CHUNK):  # chunks bound the registers
        splits = first + tl.arange(0, SPLIT_CHUNK)  # [C]
        rc_mask = r_mask[:, None] & (splits < NUM_SPLITS)[None, :]  # [R, C]
        parts = base[:, None] + splits[None, :]  # [R, C]
        lse = tl.load(partial_lse_ptr + parts, mask=rc_mask, other=float("-inf"),
                      cache_modifier=".cg")  # [R, C]
        values = tl.load(partial_out_ptr + parts[:, :, None] * HEAD_SIZE + offs_d[None, None, :],
                         mask=rc_mask[:, :, None] & d_mask[None, None, :], other=0.0,
                         cache_modifier=".cg")  # [R, C, HEAD_PAD]
        m_new = tl.maximum(m_i, tl.max(lse, axis=1))  # [R]
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)  # 0 while nothing was merged (m_i -inf)
        weights = tl.exp2(lse - m_safe[:, None])  # [R, C]
        total = total * alpha + tl.sum(weights, axis=1)
        acc = acc * alpha[:, None] + tl.sum(values * weights[:, :, None], axis=1)
        m_i = m_new
    out = acc / tl.where(total == 0.0, 1.0, total)[:, None]
    tl.store(out_ptr + token * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=r_mask[:, None] & d_mask[None, :])


@triton.jit
def partition_bounds(seq_len, kv_begin, split, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr):
    # Keys [begin, end) of partition ``split`` of the visible keys [kv_begin, seq_len):
    # whole BLOCK_N tiles, aligned so a tile never straddles more blocks than it must
    # (the first one may start before kv_begin: callers mask those keys). May be empty.
    tiles_begin = kv_begin // BLOCK_N * BLOCK_N
    tiles_per_split = tl.cdiv(tl.cdiv(seq_len - tiles_begin, BLOCK_N), NUM_SPLITS)
    split_begin = tiles_begin + split * tiles_per_split * BLOCK_N
    split_end = tl.minimum(split_begin + tiles_per_split * BLOCK_N, seq_len)
    return split_begin, split_end


# The block table's width changes from step to step (eager steps): one compiled variant.
@triton.jit(do_not_specialize=["stride_table"])
def _decode_split_kernel(
    out_ptr, partial_out_ptr, partial_lse_ptr, counters_ptr, query_ptr, key_cache_ptr,
    value_cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    sm_scale, softcap, window,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_block, stride_slot, stride_head, stride_table, v_scale,
    GROUP_SIZE: tl.constexpr, GROUP_PAD: tl.constexpr, MERGE_ROWS: tl.constexpr,
    HEAD_SIZE: tl.constexpr, HEAD_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLIT_CHUNK: tl.constexpr,
    FUSED_REDUCE: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    PRECISION: tl.constexpr, KV_FP8: tl.constexpr,
):
    kv_head = tl.program_id(0)
    seq = tl.program_id(1)
    num_kv_heads = tl.num_programs(0)
    split = tl.program_id(2)
    # Everything below waits on these three loads: one round trip, before any branch.
    q_start = tl.load(query_start_loc_ptr + seq)
    q_end = tl.load(query_start_loc_ptr + seq + 1)
    seq_len = tl.load(seq_lens_ptr + seq)
    # A sequence without a new token has no output row. It is masked rather than branched
    # on, so the query and block-id loads need not wait for the test: it attends no key,
    # stores nothing and never touches its counter (all its splits agree on that).
    has_token = q_end > q_start
    seq_len = tl.where(has_token, seq_len, 0)
    kv_begin = 0
    if HAS_WINDOW:
        kv_begin = tl.maximum(seq_len - window, 0)
    split_begin, split_end = partition_bounds(seq_len, kv_begin, split, NUM_SPLITS, BLOCK_N)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_PAD)
    d_mask = offs_d < HEAD_SIZE
    heads = kv_head * GROUP_SIZE + offs_g  # [G]
    row_mask = (offs_g < GROUP_SIZE)[:, None] & d_mask[None, :] & has_token  # [G, HEAD_PAD]
    token = (q_end - 1).to(tl.int64)  # the sequence's only new token (-1 without one)
    q = tl.load(query_ptr + token * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=row_mask, other=0.0)  # [G, HEAD_PAD]

    table_row_ptr, block_ids, m_i, l_i, acc = start_kv_loop(
        block_tables_ptr, seq, stride_table, split_begin, split_end, GROUP_PAD, HEAD_PAD, BLOCK_N,
        BLOCK_SIZE)
    for start in range(split_begin, split_end, BLOCK_N):
        key_pos = start + tl.arange(0, BLOCK_N)  # [N]
        key_valid = (key_pos < split_end) & (key_pos >= kv_begin)
        k, v, block_ids = gather_kv_tile(key_cache_ptr, value_cache_ptr, table_row_ptr, block_ids,
                                         key_pos, key_valid, split_end, kv_head, offs_d, d_mask,
                                         stride_block, stride_slot, stride_head, BLOCK_N,
                                         BLOCK_SIZE)
        m_i, l_i, acc = attend_tile(q, k, v, key_valid[None, :], m_i, l_i, acc, sm_scale, softcap,
                                    HAS_SOFTCAP, PRECISION)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    if KV_FP8:
        # The values' dequantization: the merge is linear, so partials may carry it.
        out = out * v_scale
    if NUM_SPLITS == 1:
        tl.store(out_ptr + token * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_mask)
    else:
        # An empty partition stores lse -inf and zeros: the merge gives it no weight.
        lse = tl.where(l_i > 0.0, m_i + tl.log2(tl.where(l_i > 0.0, l_i, 1.0)), float("-inf"))
        num_heads = num_kv_heads * GROUP_SIZE
        parts = (seq.to(tl.int64) * num_heads + heads) * NUM_SPLITS + split  # [G]
        tl.store(partial_lse_ptr + parts, lse, mask=(offs_g < GROUP_SIZE) & has_token)
        tl.store(partial_out_ptr + parts[:, None] * HEAD_SIZE + offs_d[None, :], out,
                 mask=row_mask)
        if FUSED_REDUCE:
            # One thread performs the (scalar) atomic: the barrier orders every thread's
            # partial stores before it, and its release (cumulative) publishes them all.
            tl.debug_barrier()
            counter = counters_ptr + seq * num_kv_heads + kv_head
            arrived = tl.atomic_add(counter, 1, mask=has_token, sem="acq_rel", scope="gpu")
            if has_token & (arrived == NUM_SPLITS - 1):
                # The last arrival: its acquire saw the other NUM_SPLITS - 1 releases, so
                # every partial of the group is in L2 (read past the L1, see the merge).
                _merge_partials(out_ptr, partial_out_ptr, partial_lse_ptr, seq,
                                kv_head * GROUP_SIZE, num_heads, token, stride_ot, stride_oh,
                                GROUP_SIZE, MERGE_ROWS, HEAD_SIZE, HEAD_PAD, NUM_SPLITS,
                                SPLIT_CHUNK)
                # Every split has arrived, so nothing else touches the counter in this
                # launch: a plain store leaves it 0 for the next launch or graph replay.
                tl.store(counter, 0)


@triton.jit
def _decode_reduce_kernel(out_ptr, partial_out_ptr, partial_lse_ptr, query_start_loc_ptr,
                          stride_ot, stride_oh, HEAD_SIZE: tl.constexpr, HEAD_PAD: tl.constexpr,
                          NUM_SPLITS: tl.constexpr, SPLIT_CHUNK: tl.constexpr):
    # The fallback merge, a second launch: grid (num_seqs, num_heads), one head a program.
    seq = tl.program_id(0)
    head = tl.program_id(1)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_end = tl.load(query_start_loc_ptr + seq + 1)
    if q_end == q_start:
        return
    _merge_partials(out_ptr, partial_out_ptr, partial_lse_ptr, seq, head, tl.num_programs(1),
                    (q_end - 1).to(tl.int64), stride_ot, stride_oh, 1, 1, HEAD_SIZE, HEAD_PAD,
                    NUM_SPLITS, SPLIT_CHUNK)


# fmt: on


def decode_tile(head_size: int, group_size: int, element_size: int) -> Tile:
    """The tile of :func:`decode_attention`: the group padded to 16 rows, 64 keys (4+
    KV blocks of 16 per load), 4 warps, 3 stages, so the key/value copies run two tiles
    ahead: with one tile ahead the memory system idles between tiles, and more stages
    take shared memory that would otherwise hold more programs per SM. float32 (FMA
    dots) takes 8 warps and fewer keys to avoid spills."""
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


def merge_chunk(rows: int, head_pad: int, num_splits: int) -> int:
    """Partitions a merging program loads per step for ``rows`` heads (a power of two)."""
    return max(1, min(triton.next_power_of_2(num_splits), MERGE_TILE_ELEMENTS // (rows * head_pad)))


_counters: dict[torch.device, torch.Tensor] = {}
#: Outgrown counter buffers stay allocated: captured CUDA graphs may still replay on them.
_retired_counters: list[torch.Tensor] = []


def split_counters(device: torch.device, needed: int) -> torch.Tensor | None:
    """``device``'s int32 arrival counters (all 0 between launches), at least ``needed``;
    ``None`` when they would have to be allocated during a CUDA-graph capture (the buffer
    would come from the graph's private pool, zeroed only when the graph replays)."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    counters = _counters.get(device)
    if counters is not None and counters.numel() >= needed:
        return counters
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return None
    if counters is not None:
        _retired_counters.append(counters)
    size = max(COUNTER_SLOTS, triton.next_power_of_2(needed))
    counters = torch.zeros(size, dtype=torch.int32, device=device)
    _counters[device] = counters
    return counters


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
    *,
    fused_reduce: bool = True,
    k_scale: float = 1.0,  # an FP8 cache's key and value scales (ignored otherwise)
    v_scale: float = 1.0,
    tile: Tile | None = None,  # None: decode_tile (benchmarks sweep others)
) -> None:
    """Split-KV attention of each sequence's single new token over its whole context.

    ``fused_reduce`` merges the partitions in the split kernel, unless a CUDA-graph
    capture would have to allocate or grow the arrival counters (then, and with
    ``fused_reduce=False``, a second launch merges them)."""
    _, num_heads, head_size = query.shape
    num_seqs = seq_lens.shape[0]
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    group_size = num_heads // num_kv_heads
    head_pad = padded_head_size(head_size)
    if tile is None:
        tile = decode_tile(head_size, group_size, query.element_size())
    if num_splits is None:
        visible = max_seq_len if sliding_window is None else min(max_seq_len, sliding_window)
        num_splits = choose_num_splits(num_seqs, num_kv_heads, visible, num_sms(query.device))
    # With one split the kernel writes ``out`` and never reads these.
    partial_out = partial_lse = counters = out
    fused = False
    if num_splits > 1:
        partial_out = torch.empty(
            (num_seqs, num_heads, num_splits, head_size), dtype=torch.float32, device=out.device
        )
        partial_lse = torch.empty(
            (num_seqs, num_heads, num_splits), dtype=torch.float32, device=out.device
        )
        found = split_counters(out.device, num_seqs * num_kv_heads) if fused_reduce else None
        if found is not None:
            counters, fused = found, True
    merge_rows = triton.next_power_of_2(group_size)
    sm_scale, value_scale, kv_fp8 = kv_scales(kv_cache, scale, k_scale, v_scale)
    with on_device(query.device):
        _decode_split_kernel[(num_kv_heads, num_seqs, num_splits)](
            out, partial_out, partial_lse, counters, query, kv_cache[0], kv_cache[1],
            block_tables, seq_lens, query_start_loc, sm_scale, logit_softcap or 0.0,
            sliding_window or 0, query.stride(0), query.stride(1), out.stride(0), out.stride(1),
            *cache_strides(kv_cache, block_tables), value_scale,
            GROUP_SIZE=group_size, GROUP_PAD=tile.block_m, MERGE_ROWS=merge_rows,
            HEAD_SIZE=head_size, HEAD_PAD=head_pad, BLOCK_SIZE=block_size,
            BLOCK_N=tile.block_n, NUM_SPLITS=num_splits,
            SPLIT_CHUNK=merge_chunk(merge_rows, head_pad, num_splits), FUSED_REDUCE=fused,
            HAS_WINDOW=sliding_window is not None, HAS_SOFTCAP=logit_softcap is not None,
            PRECISION=dot_precision(query.dtype), KV_FP8=kv_fp8,
            num_warps=tile.num_warps, num_stages=tile.num_stages,
        )  # fmt: skip
        if num_splits > 1 and not fused:
            _decode_reduce_kernel[(num_seqs, num_heads)](
                out, partial_out, partial_lse, query_start_loc, out.stride(0), out.stride(1),
                HEAD_SIZE=head_size, HEAD_PAD=head_pad, NUM_SPLITS=num_splits,
                SPLIT_CHUNK=merge_chunk(1, head_pad, num_splits),
                num_warps=4,
            )  # fmt: skip
