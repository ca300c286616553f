"""The CUDA platform's plain-torch attention against the reference.

The backend is device-agnostic torch, so it runs here on the CPU too; on a machine with
a GPU every case also runs on ``cuda``.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kvplane.attention.reference import ReferenceAttentionBackend
from kvplane.plugins.types import AttentionSpec
from kvplane_cuda import attention
from kvplane_cuda.attention import CudaAttentionBackend
from tests.platforms.paged_batches import (
    PagedBatch,
    batch_to,
    make_paged_batch,
    make_spec,
    random_lengths,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# Prefill runs SDPA in the model dtype (flash attention on a GPU): low-precision
# probabilities, as every GPU kernel has; decode and softcap run in float32.
TOLERANCES = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 3e-3}

SPECS = {
    "gqa": make_spec(),
    "mqa": make_spec(num_kv_heads=1, head_size=64),
    "window": make_spec(sliding_window=5),
    "softcap": make_spec(logit_softcap=2.0),
    "window-softcap": make_spec(sliding_window=3, logit_softcap=5.0),
    "block16": make_spec(block_size=16, head_size=128, num_heads=4, num_kv_heads=4),
    "block3": make_spec(block_size=3, num_heads=6, num_kv_heads=3),
}


def assert_matches(
    spec: AttentionSpec, batch: PagedBatch, device: str, backend: CudaAttentionBackend | None = None
) -> None:
    expected_cache = batch.kv_cache.clone()
    expected = (
        ReferenceAttentionBackend()
        .make_impl(spec)
        .forward(batch.query, batch.key, batch.value, expected_cache, batch.metadata)
    )
    on_device = batch_to(batch, torch.device(device))
    impl = (backend or CudaAttentionBackend()).make_impl(spec)
    actual = impl.forward(
        on_device.query, on_device.key, on_device.value, on_device.kv_cache, on_device.metadata
    )
    assert actual.device.type == device
    actual = actual.cpu()
    assert not actual.isnan().any(), "the backend read a slot it must not read"
    tolerance = TOLERANCES[spec.dtype]
    torch.testing.assert_close(actual, expected, atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(
        on_device.kv_cache.cpu(), expected_cache, atol=0, rtol=0, equal_nan=True
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec_id", SPECS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_random_mixed_batches_match_reference(
    device: str, spec_id: str, dtype: torch.dtype, generator: torch.Generator
) -> None:
    spec = dataclasses.replace(SPECS[spec_id], dtype=dtype)
    for _ in range(2):
        query_lens, cached_lens = random_lengths(generator, num_seqs=5, max_query=9, max_cached=21)
        batch = make_paged_batch(spec, query_lens, cached_lens, generator)
        assert_matches(spec, batch, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("query_lens", "cached_lens"),
    [([1, 1, 1, 1], [0, 3, 17, 40]), ([12], [0]), ([5, 1, 0, 7], [9, 0, 6, 1])],
)
def test_edge_batches_match_reference(
    device: str, query_lens: list[int], cached_lens: list[int], generator: torch.Generator
) -> None:
    for spec in (SPECS["gqa"], SPECS["window"]):
        assert_matches(spec, make_paged_batch(spec, query_lens, cached_lens, generator), device)


@pytest.mark.parametrize("device", DEVICES)
def test_chunked_decode_and_scores_still_match(
    device: str, monkeypatch: pytest.MonkeyPatch, generator: torch.Generator
) -> None:
    monkeypatch.setattr(attention, "DECODE_CHUNK_ELEMENTS", 3 * 20 * 2 * 2 * 32)
    monkeypatch.setattr(attention, "SCORE_CHUNK_ELEMENTS", 8 * 30 * 3)
    spec = make_spec(logit_softcap=4.0)
    cached_lens = [19, 18, 19, 17, 16, 19, 2, 1, 5, 0]
    batch = make_paged_batch(spec, [1] * len(cached_lens) + [17], [*cached_lens, 12], generator)
    plan = attention.plan_step(batch.metadata, spec, spec.block_size)
    assert len(plan.decode_chunks) >= 4 and len(plan.prefills) == 1
    assert_matches(spec, batch, device)


def test_plan_is_shared_by_layers_and_redone_for_new_metadata(generator: torch.Generator) -> None:
    spec = make_spec()
    backend = CudaAttentionBackend()
    batch = make_paged_batch(spec, [3, 1], [5, 9], generator)
    for _ in range(2):
        assert_matches(spec, batch, "cpu", backend)
    plans = backend._plans[spec]
    plan = plans.get(batch.metadata, spec, spec.block_size)
    assert plans.get(batch.metadata, spec, spec.block_size) is plan
    next_step = dataclasses.replace(batch.metadata)  # a new object, as each step builds
    assert plans.get(next_step, spec, spec.block_size) is not plan


def test_cannot_serve_explains() -> None:
    backend = CudaAttentionBackend()
    assert backend.cannot_serve(make_spec()) is None
    assert "multiple" in (backend.cannot_serve(make_spec(num_heads=7)) or "")
    assert "floating" in (backend.cannot_serve(make_spec(dtype=torch.int8)) or "")
