"""The FP8 KV cache in the attention contract: who gets one, what the writer is passed,
and the reference attention over it against float32 attention over its dequantized
values."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kvplane.attention.backend import AttentionBackend, AttentionImpl
from kvplane.attention.reference import ReferenceAttentionBackend, ReferenceAttentionImpl
from kvplane.plugins.types import AttentionSpec
from kvplane.testing.helpers import (
    FP8_KV_DTYPE,
    fp8_reference,
    make_attention_spec,
    make_paged_batch_for,
)

FLOAT_SPEC = make_attention_spec()
FP8_SPEC = make_attention_spec(kv_cache_dtype=FP8_KV_DTYPE)


class OlderBackend(AttentionBackend):
    """A backend written before FP8 caches: its cannot_serve ends with super()'s."""

    name = "older"

    def make_impl(self, spec: AttentionSpec) -> AttentionImpl:
        return ReferenceAttentionImpl(spec)


def test_backends_get_fp8_caches_only_when_they_say_they_read_them() -> None:
    older = OlderBackend()
    assert older.cannot_serve(FLOAT_SPEC) is None
    assert older.cannot_serve(FP8_SPEC) == (
        "kv_cache_dtype torch.float8_e4m3fn: backend 'older' does not read FP8 KV caches "
        "(it does not set supports_fp8_kv_cache)"
    )
    assert ReferenceAttentionBackend().cannot_serve(FP8_SPEC) is None


def test_forward_passes_the_scales_to_the_writer_of_an_fp8_cache_only() -> None:
    calls: list[tuple[object, ...]] = []

    def writer(*args: object) -> None:
        calls.append(args[4:])

    batch = make_paged_batch_for(FP8_SPEC, [3], [2], torch.Generator().manual_seed(0))
    for spec in (FLOAT_SPEC, FP8_SPEC):
        impl = ReferenceAttentionImpl(spec)
        impl.write_kv_cache = writer
        impl.k_scale, impl.v_scale = 0.5, 4.0
        cache = batch.kv_cache.to(spec.kv_cache_dtype or spec.dtype)
        impl.forward(batch.query, batch.key, batch.value, cache, batch.metadata)
    # A float cache keeps the four-argument call of writers before plugin API 1.5.
    assert calls == [(), (0.5, 4.0)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("k_scale", "v_scale"), [(1.0, 1.0), (0.37, 1.7)])
@pytest.mark.parametrize(
    "changes", [{}, {"sliding_window": 5, "logit_softcap": 3.0}], ids=["plain", "window-softcap"]
)
def test_reference_attention_over_fp8_is_float32_attention_over_the_dequantized_cache(
    dtype: torch.dtype, k_scale: float, v_scale: float, changes: dict[str, object]
) -> None:
    spec = dataclasses.replace(FP8_SPEC, dtype=dtype, **changes)  # type: ignore[arg-type]
    generator = torch.Generator().manual_seed(1)
    batch = make_paged_batch_for(spec, [0, 9, 17, 4], [7, 1, 1, 5], generator)
    expected, expected_cache = fp8_reference(spec, batch, k_scale, v_scale)
    impl = ReferenceAttentionImpl(spec)
    impl.k_scale, impl.v_scale = k_scale, v_scale
    cache = batch.kv_cache.clone()
    actual = impl.forward(batch.query, batch.key, batch.value, cache, batch.metadata)
    assert actual.dtype == dtype and not actual.isnan().any()
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-6)
    assert torch.equal(cache.view(torch.uint8), expected_cache.view(torch.uint8))
    # The scales matter: reading with others gives another result.
    impl.v_scale = v_scale * 1.5
    other = impl.attend(batch.query, cache, batch.metadata)
    assert not torch.allclose(other.float(), expected.float(), atol=1e-3)
