"""Random paged-attention batches for the platform tests (import from the tests)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvplane.attention.metadata import AttentionMetadata
from kvplane.plugins.types import AttentionSpec


@dataclass(frozen=True)
class PagedBatch:
    """New tokens of several sequences plus a cache holding their earlier tokens.

    Cache slots that belong to no sequence, and one "poison" block that pads every block
    table, hold NaN: a backend reading anything it should not turns its output NaN.
    """

    metadata: AttentionMetadata
    query: torch.Tensor  # [num_tokens, num_heads, head_size]
    key: torch.Tensor  # [num_tokens, num_kv_heads, head_size]
    value: torch.Tensor  # [num_tokens, num_kv_heads, head_size]
    kv_cache: torch.Tensor  # [2, num_blocks, block_size, num_kv_heads, head_size]


def make_spec(**changes: object) -> AttentionSpec:
    """A small GQA spec (8 query heads on 2 KV heads, head size 32, block size 4)."""
    base = AttentionSpec(
        num_heads=8,
        num_kv_heads=2,
        head_size=32,
        dtype=torch.float32,
        block_size=4,
        scale=32**-0.5,
    )
    return dataclasses.replace(base, **changes)


def make_paged_batch(
    spec: AttentionSpec,
    query_lens: Sequence[int],
    cached_lens: Sequence[int],
    generator: torch.Generator,
) -> PagedBatch:
    """Sequence ``i`` has ``cached_lens[i]`` tokens in the cache and ``query_lens[i]`` new
    ones (whose slots are in ``slot_mapping``); blocks are scattered at random."""
    block_size, dtype = spec.block_size, spec.dtype
    seq_lens = [q + c for q, c in zip(query_lens, cached_lens, strict=True)]
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3
    free_blocks = torch.randperm(num_blocks, generator=generator).tolist()
    poison_block = free_blocks.pop()
    width = max(blocks_per_seq) + 1  # padded tables, so padding exists even at the max
    tables: list[list[int]] = []
    slots: list[int] = []
    cached_slots: list[int] = []
    for seq_len, query_len, num in zip(seq_lens, query_lens, blocks_per_seq, strict=True):
        table = [free_blocks.pop() for _ in range(num)]
        tables.append(table + [poison_block] * (width - num))
        seq_slots = [table[p // block_size] * block_size + p % block_size for p in range(seq_len)]
        cached_slots += seq_slots[: seq_len - query_len]
        slots += seq_slots[seq_len - query_len :]
    starts = [0]
    for query_len in query_lens:
        starts.append(starts[-1] + query_len)
    num_tokens = starts[-1]

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(dtype)

    kv_heads, head_size = spec.num_kv_heads, spec.head_size
    kv_cache = torch.full((2, num_blocks, block_size, kv_heads, head_size), float("nan"))
    kv_cache = kv_cache.to(spec.kv_cache_dtype or dtype)
    flat = kv_cache.view(2, -1, kv_heads, head_size)
    cached = torch.tensor(cached_slots, dtype=torch.long)
    flat[:, cached] = randn(2, len(cached_slots), kv_heads, head_size).to(kv_cache.dtype)
    metadata = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=torch.tensor(tables, dtype=torch.int32),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        query_start_loc_cpu=tuple(starts),
        seq_lens_cpu=tuple(seq_lens),
    )
    return PagedBatch(
        metadata,
        randn(num_tokens, spec.num_heads, head_size),
        randn(num_tokens, kv_heads, head_size),
        randn(num_tokens, kv_heads, head_size),
        kv_cache,
    )


def random_lengths(
    generator: torch.Generator, num_seqs: int, max_query: int, max_cached: int
) -> tuple[list[int], list[int]]:
    """A mixed batch: about half decodes (1 new token), the rest prefill chunks."""

    def draw(high: int) -> int:
        return int(torch.randint(0, high + 1, (1,), generator=generator))

    query_lens = [1 if draw(1) else 1 + draw(max_query - 1) for _ in range(num_seqs)]
    cached_lens = [draw(max_cached) for _ in range(num_seqs)]
    return query_lens, cached_lens


def batch_to(batch: PagedBatch, device: torch.device) -> PagedBatch:
    """A copy of ``batch`` with every tensor on ``device`` (host lengths unchanged)."""
    metadata = batch.metadata
    moved = dataclasses.replace(
        metadata,
        slot_mapping=metadata.slot_mapping.to(device),
        query_start_loc=metadata.query_start_loc.to(device),
        seq_lens=metadata.seq_lens.to(device),
        block_tables=metadata.block_tables.to(device),
    )
    return PagedBatch(
        moved,
        batch.query.to(device),
        batch.key.to(device),
        batch.value.to(device),
        batch.kv_cache.to(device),
    )
