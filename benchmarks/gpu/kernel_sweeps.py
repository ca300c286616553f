"""Launch-shape sweeps of the CUDA attention kernels, and the copy at the same size.

Used by the attention section (:mod:`benchmarks.gpu.attention_bw`) to tune the tiles that
:func:`~kvplane_cuda.kernels.decode_attention.decode_tile` and
:func:`~kvplane_cuda.kernels.paged_attention.unified_tile` pick:

- :func:`decode_tile_sweep`: the split-KV decode kernel's ``layers`` rate (GB/s read) for
  each candidate tile (keys a tile, warps, pipeline stages) and split count;
- :func:`copy_same_bytes`: ``torch``'s copy moving as many bytes (read + write) as one
  decode launch reads, timed the same way: what a plain streaming kernel reaches at that
  size, against the large-buffer copy rate the targets use;
- :func:`prefill_tile_sweep`: the unified (prefill / mixed) kernel's TFLOP/s on a fresh
  prefill batch and on a chunk over a long cached context, per candidate tile.

Each timing is a CUDA graph of several launches on distinct inputs, per launch (the
caller's ``per_launch``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from benchmarks.gpu.decode_breakdown import decode_launcher

from kvplane_cuda.kernels.decode_attention import decode_tile
from kvplane_cuda.kernels.paged_attention import Tile, unified_attention

PerLaunch = Callable[[list[Callable[[], Any]]], float]

#: (keys a tile, warps, stages) of the decode candidates; rows come from the group size.
DECODE_CANDIDATES = ((64, 4, 2), (64, 4, 3), (64, 4, 4), (32, 4, 3), (32, 4, 4), (32, 4, 5))
#: (rows, keys, warps, stages) of the prefill candidates.
PREFILL_CANDIDATES = (
    (128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 4, 3), (64, 64, 4, 4), (128, 128, 8, 2),
    (128, 32, 4, 3), (128, 64, 4, 3), (256, 64, 8, 2),
)  # fmt: skip
#: (sequences, new tokens each, cached tokens each) of the prefill shapes.
PREFILL_SHAPES = ((4, 2048, 0), (1, 2048, 8192))


def decode_tile_sweep(
    layers: list[tuple[Any, ...]],
    bytes_read: int,
    split_counts: Sequence[int],
    per_launch: PerLaunch,
    fused_reduce: bool = True,
    candidates: Sequence[tuple[int, int, int]] = DECODE_CANDIDATES,
) -> dict[str, Any]:
    """GB/s read per candidate ``n<keys>w<warps>s<stages>/splits<count>`` on ``layers``
    (``impl.forward`` argument tuples of one shape), the partitions merged as
    ``fused_reduce`` says; ``candidates`` are (keys a tile, warps, stages). Errors are
    reported, not raised."""
    query, kv_cache = layers[0][0], layers[0][3]
    group_size = query.shape[1] // kv_cache.shape[3]
    group_rows = decode_tile(query.shape[2], group_size, query.element_size()).block_m
    sweep: dict[str, Any] = {}
    for block_n, num_warps, num_stages in candidates:
        tile = Tile(group_rows, block_n, num_warps, num_stages)
        for num_splits in split_counts:
            name = f"n{block_n}w{num_warps}s{num_stages}/splits{num_splits}"
            launches = [decode_launcher(layer, num_splits, fused_reduce, tile) for layer in layers]
            try:
                sweep[name] = bytes_read / per_launch(launches) / 1e9
            except Exception as error:
                sweep[name] = f"{type(error).__name__}: {error}"[:200]
    return sweep


def copy_same_bytes(
    num_bytes: int, num_launches: int, per_launch: PerLaunch, device: str = "cuda"
) -> dict[str, float]:
    """Microseconds and GB/s (read + write) of a device copy moving ``num_bytes`` in
    total, ``num_launches`` of them on distinct buffers (none in L2 when timed)."""
    buffers = [
        (torch.empty(num_bytes // 2, dtype=torch.uint8, device=device).fill_(1),
         torch.empty(num_bytes // 2, dtype=torch.uint8, device=device))
        for _ in range(num_launches)
    ]  # fmt: skip
    launches: list[Callable[[], Any]] = [functools.partial(dst.copy_, src) for src, dst in buffers]
    seconds = per_launch(launches)
    return {"us": seconds * 1e6, "read_write_GBps": num_bytes / seconds / 1e9}


def prefill_tile_sweep(
    num_heads: int,
    num_kv_heads: int,
    head_size: int,
    block_size: int,
    dtype: torch.dtype,
    per_launch: PerLaunch,
    num_launches: int = 4,
    shapes: Sequence[tuple[int, int, int]] = PREFILL_SHAPES,
    device: str = "cuda",
) -> dict[str, Any]:
    """TFLOP/s (causal attention FLOPs) per shape ``s<seqs>q<new>c<cached>`` and candidate
    ``m<rows>n<keys>w<warps>s<stages>`` (``default`` = unified_tile's choice)."""
    result: dict[str, Any] = {}
    for num_seqs, query_len, cached_len in shapes:
        shape = f"s{num_seqs}q{query_len}c{cached_len}"
        inputs = [
            _prefill_inputs(num_seqs, query_len, cached_len, num_heads, num_kv_heads, head_size,
                            block_size, dtype, device)
            for _ in range(num_launches)
        ]  # fmt: skip
        # Each new token attends its cached keys and the new ones up to itself.
        keys_seen = num_seqs * (query_len * cached_len + query_len * (query_len + 1) // 2)
        flops = 4 * keys_seen * head_size * num_heads
        candidates: list[tuple[str, Tile | None]] = [("default", None)]
        candidates += [(f"m{m}n{n}w{w}s{s}", Tile(m, n, w, s)) for m, n, w, s in PREFILL_CANDIDATES]
        rates: dict[str, Any] = {}
        for name, tile in candidates:
            launches = [_prefill_launch(args, query_len, tile) for args in inputs]
            try:
                rates[name] = flops / per_launch(launches) / 1e12
            except Exception as error:
                rates[name] = f"{type(error).__name__}: {error}"[:200]
        result[shape] = rates
        del inputs
        if device == "cuda":
            torch.cuda.empty_cache()
    return result


def _prefill_inputs(
    num_seqs: int,
    query_len: int,
    cached_len: int,
    num_heads: int,
    num_kv_heads: int,
    head_size: int,
    block_size: int,
    dtype: torch.dtype,
    device: str,
) -> tuple[torch.Tensor, ...]:
    seq_len = cached_len + query_len
    blocks_per_seq = -(-seq_len // block_size)
    num_blocks = num_seqs * blocks_per_seq
    kv_cache = torch.randn(
        (2, num_blocks, block_size, num_kv_heads, head_size), dtype=dtype, device=device
    )
    # [num_seqs, blocks_per_seq], scattered as a long-running cache leaves them
    block_tables = torch.randperm(num_blocks, device=device).view(num_seqs, -1).int()
    query = torch.randn(num_seqs * query_len, num_heads, head_size, dtype=dtype, device=device)
    seq_lens = torch.full((num_seqs,), seq_len, dtype=torch.int32, device=device)
    query_start_loc = torch.arange(num_seqs + 1, dtype=torch.int32, device=device) * query_len
    return query, kv_cache, block_tables, seq_lens, query_start_loc


def _prefill_launch(
    inputs: tuple[torch.Tensor, ...], query_len: int, tile: Tile | None
) -> Callable[[], Any]:
    query, kv_cache, block_tables, seq_lens, query_start_loc = inputs
    out = torch.empty_like(query)

    def launch() -> Any:
        unified_attention(
            out, query, kv_cache, block_tables, seq_lens, query_start_loc, query_len,
            query.shape[-1] ** -0.5, tile=tile,
        )  # fmt: skip
        return out

    return launch


__all__ = [
    "DECODE_CANDIDATES",
    "PREFILL_CANDIDATES",
    "PREFILL_SHAPES",
    "copy_same_bytes",
    "decode_tile_sweep",
    "prefill_tile_sweep",
]
