"""The CPU attention backend against the core's reference paged attention."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kvplane.attention.reference import ReferenceAttentionBackend
from kvplane.plugins.types import AttentionSpec
from kvplane.testing.helpers import (
    FP8_KV_DTYPE,
    PagedBatch,
    fp8_reference,
    make_attention_spec,
    make_paged_batch_for,
    random_lengths,
)
from kvplane_cpu import attention
from kvplane_cpu.attention import CpuAttentionBackend

TOLERANCES = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}

SPECS = {
    "gqa": make_attention_spec(),
    "mha": make_attention_spec(num_kv_heads=8),
    "mqa": make_attention_spec(num_kv_heads=1),
    "window": make_attention_spec(sliding_window=5),
    "softcap": make_attention_spec(logit_softcap=2.0),
    "window-softcap": make_attention_spec(sliding_window=3, logit_softcap=5.0),
    "block16-head64": make_attention_spec(block_size=16, head_size=64, scale=0.1),
    "block3-head80": make_attention_spec(block_size=3, head_size=80, num_heads=6, num_kv_heads=3),
    "block1": make_attention_spec(block_size=1, sliding_window=7),
}


def run_both(
    spec: AttentionSpec, batch: PagedBatch, backend: CpuAttentionBackend | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(expected output, expected cache, actual output, actual cache)."""
    expected_cache, actual_cache = batch.kv_cache.clone(), batch.kv_cache.clone()
    expected = (
        ReferenceAttentionBackend()
        .make_impl(spec)
        .forward(batch.query, batch.key, batch.value, expected_cache, batch.metadata)
    )
    backend = backend or CpuAttentionBackend()
    actual = backend.make_impl(spec).forward(
        batch.query, batch.key, batch.value, actual_cache, batch.metadata
    )
    return expected, expected_cache, actual, actual_cache


def assert_matches(
    spec: AttentionSpec, batch: PagedBatch, backend: CpuAttentionBackend | None = None
) -> None:
    expected, expected_cache, actual, actual_cache = run_both(spec, batch, backend)
    tolerance = TOLERANCES[spec.dtype]
    assert not actual.isnan().any(), "the backend read a slot it must not read"
    torch.testing.assert_close(actual, expected, atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(actual_cache, expected_cache, atol=0, rtol=0, equal_nan=True)


@pytest.mark.parametrize("spec_id", SPECS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_random_mixed_batches_match_reference(
    spec_id: str, dtype: torch.dtype, generator: torch.Generator
) -> None:
    spec = dataclasses.replace(SPECS[spec_id], dtype=dtype)
    for _ in range(3):
        cached_lens, query_lens = random_lengths(generator, num_seqs=6, max_query=9, max_context=21)
        assert_matches(spec, make_paged_batch_for(spec, cached_lens, query_lens, generator))


@pytest.mark.parametrize(
    ("query_lens", "cached_lens"),
    [
        ([1, 1, 1, 1], [0, 3, 17, 40]),  # pure decode, very different lengths
        ([12], [0]),  # one prefill without context: plain causal
        ([5, 1, 0, 7], [9, 0, 6, 1]),  # a sequence without new tokens this step
        ([1], [0]),  # the first token alone
    ],
)
@pytest.mark.parametrize("spec_id", ["gqa", "window", "softcap"])
def test_edge_batches_match_reference(
    spec_id: str, query_lens: list[int], cached_lens: list[int], generator: torch.Generator
) -> None:
    spec = SPECS[spec_id]
    assert_matches(spec, make_paged_batch_for(spec, cached_lens, query_lens, generator))


def test_float16_and_a_bfloat16_cache_of_a_float32_model(generator: torch.Generator) -> None:
    spec = make_attention_spec(dtype=torch.float16)
    assert_matches(spec, make_paged_batch_for(spec, [3, 8, 0], [4, 1, 1], generator))
    spec = make_attention_spec(kv_cache_dtype=torch.bfloat16)
    assert_matches(spec, make_paged_batch_for(spec, [3, 8, 0], [4, 1, 1], generator))


@pytest.mark.parametrize("spec_id", ["gqa", "window-softcap", "block16-head64"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_cache_matches_float32_attention_over_its_dequantized_values(
    spec_id: str, dtype: torch.dtype, generator: torch.Generator
) -> None:
    """Decode chunks and SDPA prefills over a float8_e4m3fn cache with per-layer scales,
    against :func:`~kvplane.testing.helpers.fp8_reference` (written as the reference
    write quantizes, read dequantized, attended in float32)."""
    spec = dataclasses.replace(SPECS[spec_id], dtype=dtype, kv_cache_dtype=FP8_KV_DTYPE)
    for k_scale, v_scale in ((1.0, 1.0), (0.37, 1.7)):
        cached_lens, query_lens = random_lengths(generator, num_seqs=6, max_query=9, max_context=21)
        batch = make_paged_batch_for(spec, cached_lens, query_lens, generator)
        expected, expected_cache = fp8_reference(spec, batch, k_scale, v_scale)
        impl = CpuAttentionBackend().make_impl(spec)
        impl.k_scale, impl.v_scale = k_scale, v_scale
        cache = batch.kv_cache.clone()
        actual = impl.forward(batch.query, batch.key, batch.value, cache, batch.metadata)
        assert not actual.isnan().any(), "the backend read a slot it must not read"
        tolerance = TOLERANCES[dtype]
        torch.testing.assert_close(actual, expected, atol=tolerance, rtol=tolerance)
        assert torch.equal(cache.view(torch.uint8), expected_cache.view(torch.uint8))


def test_decode_is_chunked_and_still_matches(
    monkeypatch: pytest.MonkeyPatch, generator: torch.Generator
) -> None:
    spec = make_attention_spec()
    # Room for about three sequences of 20 positions per chunk.
    monkeypatch.setattr(attention, "DECODE_CHUNK_ELEMENTS", 3 * 20 * 2 * 2 * 32)
    cached_lens = [19, 18, 19, 17, 16, 19, 2, 1, 5, 0]
    batch = make_paged_batch_for(spec, cached_lens, [1] * len(cached_lens), generator)
    plan = attention.plan_step(batch.metadata, spec, spec.block_size)
    assert len(plan.decode_chunks) >= 4  # by size, and short sequences apart from long ones
    assert sum(chunk.num_seqs for chunk in plan.decode_chunks) == len(cached_lens)
    assert_matches(spec, batch)


def test_softcap_scores_are_chunked_and_still_match(
    monkeypatch: pytest.MonkeyPatch, generator: torch.Generator
) -> None:
    monkeypatch.setattr(attention, "SCORE_CHUNK_ELEMENTS", 8 * 30 * 3)  # 3 queries a chunk
    spec = make_attention_spec(logit_softcap=3.0, sliding_window=9)
    assert_matches(spec, make_paged_batch_for(spec, [13, 20], [17, 1], generator))


def test_sliding_window_gathers_only_the_window(generator: torch.Generator) -> None:
    spec = make_attention_spec(sliding_window=4)
    batch = make_paged_batch_for(spec, [30, 2, 20], [1, 1, 6], generator)
    plan = attention.plan_step(batch.metadata, spec, spec.block_size)
    assert max(chunk.kv_len for chunk in plan.decode_chunks) == 4
    (prefill,) = plan.prefills
    assert prefill.slots.numel() == 4 - 1 + 6  # the first query's window, then the rest


def test_one_plan_serves_every_layer_and_is_redone_when_the_table_changes(
    generator: torch.Generator,
) -> None:
    spec = make_attention_spec()
    backend = CpuAttentionBackend()
    batch = make_paged_batch_for(spec, [5, 9, 2], [3, 1, 1], generator)
    layers = [backend.make_impl(spec) for _ in range(2)]
    caches = [batch.kv_cache.clone() for _ in layers]
    outputs = [
        layer.forward(batch.query, batch.key, batch.value, cache, batch.metadata)
        for layer, cache in zip(layers, caches, strict=True)
    ]
    torch.testing.assert_close(outputs[0], outputs[1], atol=0, rtol=0)
    plans = backend._plans[spec]
    first_plan = plans.get(batch.metadata, spec, spec.block_size)
    assert plans.get(batch.metadata, spec, spec.block_size) is first_plan

    # A runner that rewrites the block table in place (moving sequence 1's first block)
    # reuses the metadata object: the plan must follow the table, not the object.
    table = batch.metadata.block_tables
    old_block, new_block = int(table[1, 0]), int(table[0, -1])  # table[0, -1] is padding
    batch.kv_cache[:, new_block] = batch.kv_cache[:, old_block]
    batch.kv_cache[:, old_block] = float("nan")
    table[1, 0] = new_block
    slots = batch.metadata.slot_mapping
    block_size = spec.block_size
    moved = (slots // block_size) == old_block
    slots[moved] = new_block * block_size + slots[moved] % block_size
    assert_matches(spec, batch, backend)
    assert plans.get(batch.metadata, spec, spec.block_size) is not first_plan


def test_cannot_serve_explains() -> None:
    backend = CpuAttentionBackend()
    assert backend.cannot_serve(make_attention_spec()) is None
    assert "multiple" in (backend.cannot_serve(make_attention_spec(num_heads=7)) or "")
    assert "floating" in (
        backend.cannot_serve(make_attention_spec(kv_cache_dtype=torch.int8)) or ""
    )
    assert backend.supports_fp8_kv_cache
    assert backend.cannot_serve(make_attention_spec(kv_cache_dtype=FP8_KV_DTYPE)) is None


def test_selected_over_the_reference() -> None:
    from kvplane.plugins import select_platform

    platform = select_platform("cpu")
    backend = platform.attention_backend(make_attention_spec(logit_softcap=1.0, sliding_window=2))
    assert isinstance(backend, CpuAttentionBackend)
    assert backend.priority > ReferenceAttentionBackend.priority
