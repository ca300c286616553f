"""Where a batch-1 decode-attention launch spends its time: cut-down kernels, same grid.

The production split-KV kernel (:mod:`kvplane_cuda.kernels.decode_attention`) at batch 1
takes several microseconds more than streaming its keys and values at the copy rate
would (8k keys on an H200: 16.6 us against 7.6). These
probe kernels run on the same grid ``(num_seqs, num_kv_heads, num_splits)`` and the same
inputs, each doing a prefix of its work, so their differences split that time up:

- ``empty``: the launch alone (each program stores one zero);
- ``bookkeeping``: + the dependent loads before any key (``query_start_loc``,
  ``seq_len``, the partition bounds, the query row, the first block ids);
- ``stream``: + every key and value tile of the partition, gathered through the block
  table by the kernel's own ``gather_kv_tile``, reduced by a plain sum (no dots, no
  softmax). Triton does not software-pipeline loads that feed no ``tl.dot`` (no async
  copies in its sm_90 TTGIR), so this probe waits for each tile in turn and is slower
  than the production kernel, which keeps two tiles in flight (H200, 8k keys: 20 vs
  16.6 us): it shows what one tile in flight costs;
- ``decode``: the production kernel with its merge in the same launch;
- ``decode_separate``: the production kernel with the merge in a second launch.

Each is timed as a CUDA graph of :data:`NUM_LAYERS` launches over distinct caches, per
launch (``benchmarks.gpu.attention_bw``'s ``layers`` method). Used by the attention
section at batch 1 (``breakdown_us``); runs under Triton's interpreter too (CPU smoke).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl

from kvplane_cuda.kernels.decode_attention import decode_attention, decode_tile, partition_bounds
from kvplane_cuda.kernels.paged_attention import Tile, gather_kv_tile, table_block_ids

# fmt: off
# (Kernels keep Triton's usual dense argument lists.)


@triton.jit
def _probe_kernel(out_ptr, query_ptr, key_cache_ptr, value_cache_ptr, block_tables_ptr,
                  seq_lens_ptr, query_start_loc_ptr, stride_qt, stride_qh, stride_block,
                  stride_slot, stride_head, stride_table, GROUP_SIZE: tl.constexpr,
                  GROUP_PAD: tl.constexpr, HEAD_SIZE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                  BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, STAGE: tl.constexpr):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    program = (seq * tl.num_programs(1) + kv_head) * NUM_SPLITS + split
    total = tl.zeros([HEAD_SIZE], tl.float32)
    if STAGE >= 1:  # bookkeeping
        q_start = tl.load(query_start_loc_ptr + seq)
        q_end = tl.load(query_start_loc_ptr + seq + 1)
        seq_len = tl.where(q_end > q_start, tl.load(seq_lens_ptr + seq), 0)
        split_begin, split_end = partition_bounds(seq_len, 0, split, NUM_SPLITS, BLOCK_N)
        offs_g = tl.arange(0, GROUP_PAD)
        offs_d = tl.arange(0, HEAD_SIZE)
        heads = kv_head * GROUP_SIZE + offs_g
        q = tl.load(query_ptr + (q_end - 1).to(tl.int64) * stride_qt + heads[:, None] * stride_qh
                    + offs_d[None, :], mask=(offs_g < GROUP_SIZE)[:, None], other=0.0)
        total += tl.sum(q.to(tl.float32), axis=0)
        table_row_ptr = block_tables_ptr + seq.to(tl.int64) * stride_table
        # The first tile's block ids, as the kernel loads them before its loop.
        block_ids = table_block_ids(table_row_ptr, split_begin + tl.arange(0, BLOCK_N),
                                    split_end, BLOCK_SIZE)
        if STAGE == 1:
            total += tl.sum(block_ids.to(tl.float32), axis=0)
        else:  # stream
            d_mask = offs_d < HEAD_SIZE
            for start in range(split_begin, split_end, BLOCK_N):
                key_pos = start + tl.arange(0, BLOCK_N)
                k, v, block_ids = gather_kv_tile(key_cache_ptr, value_cache_ptr, table_row_ptr,
                                                 block_ids, key_pos, key_pos < split_end,
                                                 split_end, kv_head, offs_d, d_mask,
                                                 stride_block, stride_slot, stride_head,
                                                 BLOCK_N, BLOCK_SIZE)
                total += tl.sum(k.to(tl.float32) + v.to(tl.float32), axis=0)
    tl.store(out_ptr + program * HEAD_SIZE + tl.arange(0, HEAD_SIZE), total)


# fmt: on

STAGES = {"empty": 0, "bookkeeping": 1, "stream": 2}


def probe_launcher(
    stage: str,
    query: torch.Tensor,  # [num_tokens, num_heads, head_size]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_size]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    num_splits: int,
) -> Callable[[], Any]:
    """A function launching probe ``stage`` on the decode kernel's grid and tile."""
    num_seqs, num_heads, head_size = seq_lens.shape[0], query.shape[1], query.shape[2]
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    group_size = num_heads // num_kv_heads
    tile = decode_tile(head_size, group_size, query.element_size())
    out = torch.empty(
        (num_seqs * num_kv_heads * num_splits, head_size), dtype=torch.float32, device=query.device
    )
    grid = (num_seqs, num_kv_heads, num_splits)

    def launch() -> Any:
        _probe_kernel[grid](
            out, query, kv_cache[0], kv_cache[1], block_tables, seq_lens, query_start_loc,
            query.stride(0), query.stride(1), kv_cache.stride(1), kv_cache.stride(2),
            kv_cache.stride(3), block_tables.stride(0),
            GROUP_SIZE=group_size, GROUP_PAD=tile.block_m, HEAD_SIZE=head_size,
            BLOCK_SIZE=block_size, BLOCK_N=tile.block_n, NUM_SPLITS=num_splits,
            STAGE=STAGES[stage], num_warps=tile.num_warps, num_stages=tile.num_stages,
        )  # fmt: skip
        return out

    return launch


def decode_launcher(
    layer: tuple[Any, ...],
    num_splits: int | None,  # None: the kernel's own choice
    fused_reduce: bool = True,
    tile: Tile | None = None,
) -> Callable[[], Any]:
    """A function running the production decode kernel (no cache write) on ``layer``."""
    query, _, _, kv_cache, metadata = layer
    out = torch.empty_like(query)

    def launch() -> Any:
        decode_attention(
            out, query, kv_cache, metadata.block_tables, metadata.seq_lens,
            metadata.query_start_loc, metadata.max_seq_len, query.shape[-1] ** -0.5,
            num_splits=num_splits, fused_reduce=fused_reduce, tile=tile,
        )  # fmt: skip
        return out

    return launch


def breakdown(
    layers: list[tuple[Any, ...]], num_splits: int, time_layers: Callable[[list[Any]], float]
) -> dict[str, float]:
    """Per-launch microseconds of each probe over ``layers`` (``impl.forward`` argument
    tuples of one shape); ``time_layers`` times a list of launch functions as one graph
    and returns seconds per launch."""
    launchers: dict[str, list[Callable[[], Any]]] = {
        stage: [
            probe_launcher(stage, q, kv, m.block_tables, m.seq_lens, m.query_start_loc, num_splits)
            for q, _, _, kv, m in layers
        ]
        for stage in STAGES
    }
    launchers["decode"] = [decode_launcher(layer, num_splits, True) for layer in layers]
    launchers["decode_separate"] = [decode_launcher(layer, num_splits, False) for layer in layers]
    return {name: time_layers(functions) * 1e6 for name, functions in launchers.items()}


__all__ = ["STAGES", "breakdown", "decode_launcher", "probe_launcher"]
