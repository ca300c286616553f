"""Conformance: the platform's attention backend matches the reference paged attention.

For each spec the platform's selected backend and
:class:`kvplane.attention.reference.ReferenceAttentionImpl` run the same random batch
over copies of the same random paged cache (random non-contiguous block tables); the
outputs must agree within the dtype's matmul tolerance and the written caches exactly.
The FP8 KV-cache cases do the same over a float8_e4m3fn cache with per-layer scales
where the platform's backend reads one, and are skipped, with its reason, where not.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from kvplane.attention.backend import AttentionBackend, AttentionImpl
from kvplane.attention.reference import ReferenceAttentionImpl
from kvplane.ops.steps import byte_view
from kvplane.plugins import Platform
from kvplane.plugins.types import AttentionSpec
from kvplane.testing.helpers import (
    FP8_KV_DTYPE,
    MATMUL_TOLERANCES,
    PagedBatch,
    assert_close,
    fp8_kv_cache_backend,
    make_paged_batch_for,
    metadata_to,
)

# (num_heads, num_kv_heads, head_size, block_size, sliding_window, logit_softcap)
SPECS = {
    "mha-d64-b16": (4, 4, 64, 16, None, None),
    "gqa4-d128-b16": (8, 2, 128, 16, None, None),
    "mqa-d64-b32": (8, 1, 64, 32, None, None),
    "gqa2-d128-b32": (4, 2, 128, 32, None, None),
    "window24-d64-b16": (4, 2, 64, 16, 24, None),
    "softcap-d128-b16": (4, 4, 128, 16, None, 30.0),
    "window40-softcap-d64-b32": (8, 4, 64, 32, 40, 50.0),
}

# Per sequence: (tokens already cached, new tokens).
BATCHES = {
    "decode": [(37, 1), (0, 1), (64, 1), (15, 1)],
    "prefill": [(0, 20), (0, 1), (0, 47)],
    # Prefills with cached context (block-aligned and not) interleaved with decodes.
    "mixed": [(0, 19), (33, 1), (16, 12), (70, 1), (5, 30), (0, 1), (32, 2)],
}

#: ``(k_scale, v_scale)`` of the FP8 cases: not 1.0, so a backend that ignores or swaps
#: them fails; powers of two, so dividing and multiplying by the reciprocal round alike.
FP8_KV_SCALES = (0.25, 2.0)


def _spec(spec_id: str, dtype: torch.dtype) -> AttentionSpec:
    num_heads, num_kv_heads, head_size, block_size, window, softcap = SPECS[spec_id]
    return AttentionSpec(
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_size=head_size,
        dtype=dtype,
        block_size=block_size,
        scale=head_size**-0.5,
        sliding_window=window,
        logit_softcap=softcap,
    )


def _selected_backend(platform: Platform, spec: AttentionSpec) -> AttentionBackend:
    backend = platform.attention_backend(spec)
    assert backend.cannot_serve(spec) is None, f"{backend.name} was selected but cannot serve"
    return backend


def _with_scales(impl: AttentionImpl, kv_scales: tuple[float, float] | None) -> AttentionImpl:
    if kv_scales is not None:
        impl.k_scale, impl.v_scale = kv_scales
    return impl


def _run_and_compare(
    platform: Platform,
    device: torch.device,
    spec: AttentionSpec,
    batch: PagedBatch,
    platform_cache: torch.Tensor,  # on device, written in place
    reference_cache: torch.Tensor,  # on the CPU, written in place
    backend: AttentionBackend | None = None,  # None: the platform's selection
    kv_scales: tuple[float, float] | None = None,  # an FP8 cache's (k_scale, v_scale)
) -> None:
    backend = backend or _selected_backend(platform, spec)
    output = _with_scales(backend.make_impl(spec), kv_scales).forward(
        batch.query.to(device, copy=True),
        batch.key.to(device, copy=True),
        batch.value.to(device, copy=True),
        platform_cache,
        metadata_to(batch.metadata, device),
    )
    expected = _with_scales(ReferenceAttentionImpl(spec), kv_scales).forward(
        batch.query, batch.key, batch.value, reference_cache, batch.metadata
    )
    assert output.shape == batch.query.shape and output.dtype == batch.query.dtype
    lens = list(zip(batch.context_lens, batch.query_lens, strict=True))
    where = f"backend {backend.name!r}, spec {spec}, (cached, new) tokens per sequence {lens}"
    # Bytes: torch compares no float8 tensors on the CPU.
    assert torch.equal(byte_view(platform_cache.cpu()), byte_view(reference_cache)), (
        f"KV cache differs from the reference ({where}): new tokens must be written at "
        "their slots and nothing else touched"
    )
    assert_close(output, expected, MATMUL_TOLERANCES, message=where)


@pytest.mark.parametrize("batch_id", list(BATCHES))
@pytest.mark.parametrize("spec_id", list(SPECS))
def test_attention_matches_reference(
    kvplane_platform: Platform,
    kvplane_device: torch.device,
    kvplane_dtype: torch.dtype,
    kvplane_generator: torch.Generator,
    spec_id: str,
    batch_id: str,
) -> None:
    spec = _spec(spec_id, kvplane_dtype)
    context_lens, query_lens = zip(*BATCHES[batch_id], strict=True)
    batch = make_paged_batch_for(spec, context_lens, query_lens, kvplane_generator, poison=False)
    _run_and_compare(
        kvplane_platform,
        kvplane_device,
        spec,
        batch,
        batch.kv_cache.to(kvplane_device, copy=True),
        batch.kv_cache.clone(),
    )


@pytest.mark.parametrize("batch_id", ["decode", "mixed"])
@pytest.mark.parametrize("spec_id", ["gqa4-d128-b16", "window40-softcap-d64-b32"])
def test_fp8_kv_cache_matches_reference(
    kvplane_platform: Platform,
    kvplane_device: torch.device,
    kvplane_dtype: torch.dtype,
    kvplane_generator: torch.Generator,
    spec_id: str,
    batch_id: str,
) -> None:
    """A float8_e4m3fn cache: the new keys and values are written as the reference
    quantizes them (``x / scale``, saturated, nearest even) and read dequantized."""
    spec = replace(_spec(spec_id, kvplane_dtype), kv_cache_dtype=FP8_KV_DTYPE)
    backend = fp8_kv_cache_backend(kvplane_platform, spec)
    context_lens, query_lens = zip(*BATCHES[batch_id], strict=True)
    batch = make_paged_batch_for(spec, context_lens, query_lens, kvplane_generator, poison=False)
    _run_and_compare(
        kvplane_platform,
        kvplane_device,
        spec,
        batch,
        batch.kv_cache.to(kvplane_device, copy=True),
        batch.kv_cache.clone(),
        backend,
        FP8_KV_SCALES,
    )


@pytest.mark.parametrize("spec_id", ["gqa4-d128-b16", "window40-softcap-d64-b32"])
def test_attention_chunked_prefill_then_decode(
    kvplane_platform: Platform,
    kvplane_device: torch.device,
    kvplane_generator: torch.Generator,
    spec_id: str,
) -> None:
    """Three steps over the same sequences and caches: each step reads what the
    platform itself wrote in the earlier ones."""
    dtype = torch.float32 if "float32" in kvplane_platform.info.supported_dtypes else None
    if dtype is None:
        pytest.skip("the multi-step check runs in float32")
    spec = _spec(spec_id, dtype)
    steps = [[(0, 21), (0, 40)], [(21, 19), (40, 1)], [(40, 1), (41, 1)]]
    # Allocate blocks (and the random cache) for the sequences' final lengths up front.
    final_lens = [context + new for context, new in steps[-1]]
    first = make_paged_batch_for(
        spec, [0] * len(final_lens), final_lens, kvplane_generator, poison=False
    )
    platform_cache = first.kv_cache.to(kvplane_device, copy=True)
    reference_cache = first.kv_cache.clone()
    for step in steps:
        batch = _continue_batch(first, step, spec, kvplane_generator)
        _run_and_compare(
            kvplane_platform, kvplane_device, spec, batch, platform_cache, reference_cache
        )


def _continue_batch(
    first: PagedBatch,
    step: list[tuple[int, int]],
    spec: AttentionSpec,
    generator: torch.Generator,
) -> PagedBatch:
    """A batch for ``step`` over the block tables of ``first`` (sized for every step)."""
    fresh = make_paged_batch_for(
        spec, [context for context, _ in step], [new for _, new in step], generator, poison=False
    )
    block_tables = first.metadata.block_tables
    slots = [
        int(block_tables[seq, position // spec.block_size]) * spec.block_size
        + position % spec.block_size
        for seq, (context, new) in enumerate(step)
        for position in range(context, context + new)
    ]
    metadata = replace(
        fresh.metadata,
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        block_tables=block_tables,
    )
    return replace(fresh, kv_cache=first.kv_cache, metadata=metadata)
