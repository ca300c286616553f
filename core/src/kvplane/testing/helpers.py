"""Shared helpers of the conformance kit: dtypes, tolerances, random inputs, batches.

Public so platform packages can reuse them in their own kernel tests (the CPU and CUDA
platforms' tests and the plugin template's build their paged batches here). Random inputs are
drawn on the CPU from a seeded generator and then moved to the device, so a seed gives
the same inputs on every platform; references are computed on the CPU copies. What a
platform gets is always a copy (``.to(device, copy=True)``): on a host device ``.to``
would return the very tensor, and an op that works in place would then alter the
reference's inputs and hide its own mistakes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kvplane.attention.backend import AttentionBackend, fp8_kv_cache_refusal
from kvplane.attention.metadata import AttentionMetadata
from kvplane.plugins.platform import Platform
from kvplane.plugins.types import AttentionSpec
from kvplane.testing import KIT_DTYPES

__all__ = [
    "FP8_KV_DTYPE",
    "KIT_DTYPES",
    "MATMUL_TOLERANCES",
    "OP_TOLERANCES",
    "PagedBatch",
    "assert_close",
    "batch_to",
    "fp8_kv_cache_backend",
    "fp8_reference",
    "make_attention_spec",
    "make_paged_batch",
    "make_paged_batch_for",
    "metadata_to",
    "parse_dtype",
    "randn",
    "random_lengths",
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


#: The KV-cache dtype of ``kv_cache_dtype="fp8"``.
FP8_KV_DTYPE = torch.float8_e4m3fn


def fp8_kv_cache_backend(platform: Platform, spec: AttentionSpec) -> AttentionBackend:
    """The backend ``platform`` selects for ``spec``'s model dtype, if it also reads
    ``spec``'s FP8 cache; otherwise skips the calling test with the backend's reason
    (the engine would fall back to the reference there, which the kit need not test)."""
    import pytest

    own = platform.attention_backend(dataclasses.replace(spec, kv_cache_dtype=None))
    reason = fp8_kv_cache_refusal(own, spec) or own.cannot_serve(spec)
    if reason is not None:
        pytest.skip(
            f"platform {platform.name!r}: attention backend {own.name!r} cannot serve an "
            f"FP8 KV cache: {reason}"
        )
    return own


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
    *,
    kv_cache_dtype: torch.dtype | None = None,
    poison: bool = False,
) -> PagedBatch:
    """Build a batch whose sequences own random, non-contiguous blocks of a cache filled
    with random values (so stale data in unused slots is visible if a backend reads it).

    With ``poison``, every cache slot outside the sequences' contexts (the new tokens'
    slots included, until written) holds NaN, and each block table is padded, one entry
    wider than the longest, with a spare block: a backend that reads anything it should
    not returns NaN. The cache has ``kv_cache_dtype`` (default ``dtype``); a float8 cache
    holds the random values as its codes (as if quantized with scale 1).
    """
    if len(context_lens) != len(query_lens):
        raise ValueError("context_lens and query_lens must have one entry per sequence")
    if poison and num_spare_blocks < 1:
        raise ValueError("a poisoned batch needs a spare block to pad the block tables")
    seq_lens = [context + new for context, new in zip(context_lens, query_lens, strict=True)]
    blocks_per_seq = [math.ceil(seq_len / block_size) for seq_len in seq_lens]
    num_blocks = sum(blocks_per_seq) + num_spare_blocks
    permutation = torch.randperm(num_blocks, generator=generator).tolist()
    # Padding exists even at the longest table when poisoned; it points at a spare block.
    width = max(blocks_per_seq) + (1 if poison else 0)
    padding_block = permutation[-1] if poison else 0
    block_tables = torch.full((len(seq_lens), width), padding_block, dtype=torch.int32)
    slots: list[int] = []
    context_slots: list[int] = []
    next_block = 0
    for seq_index, (seq_len, context_len) in enumerate(zip(seq_lens, context_lens, strict=True)):
        block_ids = permutation[next_block : next_block + blocks_per_seq[seq_index]]
        next_block += len(block_ids)
        block_tables[seq_index, : len(block_ids)] = torch.tensor(block_ids, dtype=torch.int32)
        seq_slots = [
            block_ids[position // block_size] * block_size + position % block_size
            for position in range(seq_len)
        ]
        context_slots += seq_slots[:context_len]
        slots += seq_slots[context_len:]
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
    query = randn((num_tokens, num_heads, head_size), dtype, generator)
    key = randn((num_tokens, num_kv_heads, head_size), dtype, generator)
    value = randn((num_tokens, num_kv_heads, head_size), dtype, generator)
    cache_shape = (2, num_blocks, block_size, num_kv_heads, head_size)
    # Drawn and poisoned in float32, then cast: torch cannot mask-fill a float8 tensor.
    kv_cache = randn(cache_shape, torch.float32, generator)
    if poison:
        is_context = torch.zeros(num_blocks * block_size, dtype=torch.bool)
        is_context[context_slots] = True
        kv_cache.view(2, -1, num_kv_heads, head_size)[:, ~is_context] = float("nan")
    kv_cache = kv_cache.to(kv_cache_dtype or dtype)
    return PagedBatch(
        query=query,
        key=key,
        value=value,
        kv_cache=kv_cache,
        metadata=metadata,
        context_lens=tuple(context_lens),
        query_lens=tuple(query_lens),
    )


def make_attention_spec(**changes: Any) -> AttentionSpec:
    """A small GQA spec (8 query heads on 2 KV heads, head size 32, block size 4, float32)
    with ``changes`` applied (any :class:`AttentionSpec` field)."""
    base = AttentionSpec(
        num_heads=8,
        num_kv_heads=2,
        head_size=32,
        dtype=torch.float32,
        block_size=4,
        scale=32**-0.5,
    )
    return dataclasses.replace(base, **changes)


def make_paged_batch_for(
    spec: AttentionSpec,
    context_lens: Sequence[int],
    query_lens: Sequence[int],
    generator: torch.Generator,
    *,
    poison: bool = True,
) -> PagedBatch:
    """:func:`make_paged_batch` for ``spec`` (its heads, block size and dtypes), poisoned
    unless ``poison=False``."""
    return make_paged_batch(
        context_lens,
        query_lens,
        spec.num_heads,
        spec.num_kv_heads,
        spec.head_size,
        spec.block_size,
        spec.dtype,
        generator,
        kv_cache_dtype=spec.kv_cache_dtype,
        poison=poison,
    )


def random_lengths(
    generator: torch.Generator, num_seqs: int, max_query: int, max_context: int
) -> tuple[list[int], list[int]]:
    """``(context_lens, query_lens)`` of a mixed batch: about half decodes (1 new token),
    the rest prefill chunks of up to ``max_query`` tokens."""

    def draw(high: int) -> int:
        return int(torch.randint(0, high + 1, (1,), generator=generator))

    query_lens = [1 if draw(1) else 1 + draw(max_query - 1) for _ in range(num_seqs)]
    context_lens = [draw(max_context) for _ in range(num_seqs)]
    return context_lens, query_lens


def batch_to(batch: PagedBatch, device: torch.device | str) -> PagedBatch:
    """A copy of ``batch`` with every tensor on ``device`` (host lengths unchanged)."""
    device = torch.device(device)
    return dataclasses.replace(
        batch,
        query=batch.query.to(device, copy=True),
        key=batch.key.to(device, copy=True),
        value=batch.value.to(device, copy=True),
        kv_cache=batch.kv_cache.to(device, copy=True),
        metadata=metadata_to(batch.metadata, device),
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


def fp8_reference(
    spec: AttentionSpec, batch: PagedBatch, k_scale: float, v_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(output, cache)`` of a step over ``batch``'s FP8 cache (on the CPU), computed
    without any FP8 attention code: the new keys and values quantized exactly as the
    reference write (:func:`kvplane.ops.reference.reshape_and_cache`) stores them, the
    whole cache dequantized (``stored * scale``) into float32, then the float32 reference
    attention. ``output`` has the query's dtype; ``cache`` is the FP8 cache written."""
    from kvplane.attention.reference import ReferenceAttentionImpl
    from kvplane.ops import reference

    cache = batch.kv_cache.clone()
    slot_mapping = batch.metadata.slot_mapping
    reference.reshape_and_cache(batch.key, batch.value, cache, slot_mapping, k_scale, v_scale)
    float_cache = torch.stack((cache[0].float() * k_scale, cache[1].float() * v_scale))
    float_spec = dataclasses.replace(spec, dtype=torch.float32, kv_cache_dtype=None)
    output = ReferenceAttentionImpl(float_spec).attend(
        batch.query.float(), float_cache, batch.metadata
    )
    return output.to(batch.query.dtype), cache
