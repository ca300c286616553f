"""Shared helpers of the conformance kit: dtypes, tolerances, random inputs, batches.

Public so platform packages can reuse them in their own kernel tests. Random inputs are
drawn on the CPU from a seeded generator and then moved to the device, so a seed gives
the same inputs on every platform; references are computed on the CPU copies. What a
platform gets is always a copy (``.to(device, copy=True)``): on a host device ``.to``
would return the very tensor, and an op that works in place would then alter the
reference's inputs and hide its own mistakes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvplane.attention.metadata import AttentionMetadata
from kvplane.testing import KIT_DTYPES

__all__ = [
    "KIT_DTYPES",
    "MATMUL_TOLERANCES",
    "OP_TOLERANCES",
    "PagedBatch",
    "assert_close",
    "make_paged_batch",
    "metadata_to",
    "parse_dtype",
    "randn",
    "rope_cos_sin_cache",
]

#: ``(atol, rtol)`` for elementwise ops and norms: a few units in the last place.
OP_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (3e-2, 3e-2),
}

#: ``(atol, rtol)`` for attention and matmuls. float32 allows TF32-level error, since
#: tensor-core kernels (Triton ``tl.dot`` among them) multiply float32 inputs in TF32.
MATMUL_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (3e-3, 3e-3),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (3e-2, 3e-2),
}


def parse_dtype(name: str) -> torch.dtype:
    """The torch dtype called ``name`` (``"bfloat16"``, ``"torch.float16"``, ...)."""
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{name!r} is not a torch dtype name (e.g. 'float32', 'bfloat16')")
    return dtype


def randn(
    shape: Sequence[int],
    dtype: torch.dtype,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    scale: float = 1.0,
) -> torch.Tensor:
    """Standard-normal values times ``scale``, drawn on the CPU, then moved to ``device``."""
    values = torch.randn(tuple(shape), generator=generator, dtype=torch.float32) * scale
    return values.to(dtype=dtype, device=device)


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    tolerances: dict[torch.dtype, tuple[float, float]] = OP_TOLERANCES,
    message: str = "",
) -> None:
    """Compare a platform result (any device) with a CPU reference, within the tolerance
    of ``expected.dtype``; dtypes and shapes must match exactly."""
    atol, rtol = tolerances.get(expected.dtype, (0.0, 0.0))
    torch.testing.assert_close(
        actual.cpu(),
        expected.cpu(),
        atol=atol,
        rtol=rtol,
        msg=(lambda default: f"{message}\n{default}") if message else None,
    )


def rope_cos_sin_cache(
    max_position: int, rotary_dim: int, dtype: torch.dtype, base: float = 10000.0
) -> torch.Tensor:  # [max_position, rotary_dim] = cat(cos, sin)
    """The standard RoPE table: ``cat(cos, sin)`` of ``position * base**(-2i/rotary_dim)``."""
    inv_freq = base ** -(torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim)
    angles = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
    return torch.cat((angles.cos(), angles.sin()), dim=-1).to(dtype)


@dataclass(frozen=True, slots=True)
class PagedBatch:
    """A random mixed batch over a paged KV cache (all tensors on the CPU).

    ``context_lens[i]`` tokens of sequence ``i`` are already in ``kv_cache``; its
    ``query_lens[i]`` new tokens are ``query/key/value[start:end]``.
    """

    query: torch.Tensor  # [num_tokens, num_heads, head_size]
    key: torch.Tensor  # [num_tokens, num_kv_heads, head_size]
    value: torch.Tensor  # [num_tokens, num_kv_heads, head_size]
    kv_cache: torch.Tensor  # [2, num_blocks, block_size, num_kv_heads, head_size]
    metadata: AttentionMetadata
    context_lens: tuple[int, ...]
    query_lens: tuple[int, ...]


def make_paged_batch(
    context_lens: Sequence[int],
    query_lens: Sequence[int],
    num_heads: int,
    num_kv_heads: int,
    head_size: int,
    block_size: int,
    dtype: torch.dtype,
    generator: torch.Generator,
    num_spare_blocks: int = 4,
) -> PagedBatch:
    """Build a batch whose sequences own random, non-contiguous blocks of a cache filled
    with random values (so stale data in unused slots is visible if a backend reads it).
    """
    if len(context_lens) != len(query_lens):
        raise ValueError("context_lens and query_lens must have one entry per sequence")
    seq_lens = [context + new for context, new in zip(context_lens, query_lens, strict=True)]
    blocks_per_seq = [math.ceil(seq_len / block_size) for seq_len in seq_lens]
    num_blocks = sum(blocks_per_seq) + num_spare_blocks
    permutation = torch.randperm(num_blocks, generator=generator).tolist()
    max_blocks = max(blocks_per_seq)
    block_tables = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)
    slots: list[int] = []
    next_block = 0
    for seq_index, (seq_len, context_len) in enumerate(zip(seq_lens, context_lens, strict=True)):
        block_ids = permutation[next_block : next_block + blocks_per_seq[seq_index]]
        next_block += len(block_ids)
        block_tables[seq_index, : len(block_ids)] = torch.tensor(block_ids, dtype=torch.int32)
        for position in range(context_len, seq_len):
            slots.append(block_ids[position // block_size] * block_size + position % block_size)
    num_tokens = sum(query_lens)
    query_start_loc = [0]
    for query_len in query_lens:
        query_start_loc.append(query_start_loc[-1] + query_len)
    metadata = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        query_start_loc=torch.tensor(query_start_loc, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=block_tables,
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        query_start_loc_cpu=tuple(query_start_loc),
        seq_lens_cpu=tuple(seq_lens),
    )
    return PagedBatch(
        query=randn((num_tokens, num_heads, head_size), dtype, generator),
        key=randn((num_tokens, num_kv_heads, head_size), dtype, generator),
        value=randn((num_tokens, num_kv_heads, head_size), dtype, generator),
        kv_cache=randn((2, num_blocks, block_size, num_kv_heads, head_size), dtype, generator),
        metadata=metadata,
        context_lens=tuple(context_lens),
        query_lens=tuple(query_lens),
    )


def metadata_to(metadata: AttentionMetadata, device: torch.device) -> AttentionMetadata:
    """A copy of ``metadata`` whose tensors live on ``device``."""
    return AttentionMetadata(
        slot_mapping=metadata.slot_mapping.to(device, copy=True),
        query_start_loc=metadata.query_start_loc.to(device, copy=True),
        seq_lens=metadata.seq_lens.to(device, copy=True),
        block_tables=metadata.block_tables.to(device, copy=True),
        max_query_len=metadata.max_query_len,
        max_seq_len=metadata.max_seq_len,
        query_start_loc_cpu=metadata.query_start_loc_cpu,
        seq_lens_cpu=metadata.seq_lens_cpu,
    )
