"""The CUDA platform's FP8 KV cache: the quantizing cache write and both attention
kernels over a float8_e4m3fn cache with per-layer scales.

The reference is torch without FP8 attention code
(:func:`kvplane.testing.helpers.fp8_reference`): the new keys and values quantized as
the reference write does, the cache dequantized (``stored * scale``), float32 attention.
The written caches must equal it bit for bit. On the CPU the kernels run in Triton's
interpreter (float32 and float16 queries); on a GPU every case runs on ``cuda`` too,
plus bfloat16 at model shapes.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kvplane.ops import reference as ref
from kvplane.plugins.types import AttentionSpec
from kvplane.testing.helpers import (
    FP8_KV_DTYPE,
    PagedBatch,
    batch_to,
    fp8_reference,
    make_attention_spec,
    make_paged_batch_for,
)
from kvplane_cuda import attention
from kvplane_cuda.attention import TritonAttentionBackend, TritonAttentionImpl
from tests.platforms.cuda.attention_cases import SPECS, TOLERANCES
from tests.platforms.cuda.devices import DEVICES, needs_gpu

pytest.importorskip("triton")

#: ``(k_scale, v_scale)``: the default, and others (not powers of two: the kernel's
#: IEEE division must round as torch's does).
SCALES = [(1.0, 1.0), (0.37, 1.7)]
SCALE_IDS = ["unit-scales", "scales"]


def fp8_spec(spec_id: str, dtype: torch.dtype = torch.float32) -> AttentionSpec:
    return dataclasses.replace(SPECS[spec_id], dtype=dtype, kv_cache_dtype=FP8_KV_DTYPE)


def assert_fp8_matches(
    spec: AttentionSpec,
    batch: PagedBatch,
    device: str,
    scales: tuple[float, float],
    num_splits: int | None = None,
    fused_reduce: bool = True,
) -> None:
    """The Triton layer over ``batch`` on ``device`` against the torch reference on the
    CPU: the same cache bytes, outputs within the query dtype's tolerance."""
    expected, expected_cache = fp8_reference(spec, batch, *scales)
    on_device = batch_to(batch, torch.device(device))
    impl = TritonAttentionImpl(spec, num_splits, fused_reduce)
    impl.k_scale, impl.v_scale = scales
    actual = impl.forward(
        on_device.query, on_device.key, on_device.value, on_device.kv_cache, on_device.metadata
    )
    written = on_device.kv_cache.cpu()
    assert torch.equal(written.view(torch.uint8), expected_cache.view(torch.uint8))
    assert not actual.isnan().any(), "the kernel read a slot it must not read"
    tolerance = TOLERANCES[spec.dtype]
    torch.testing.assert_close(actual.cpu(), expected, atol=tolerance, rtol=tolerance)


# -- the cache write -------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scales", SCALES, ids=SCALE_IDS)
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.float16])
def test_cache_write_quantizes_as_the_reference(
    device: str, scales: tuple[float, float], input_dtype: torch.dtype, generator: torch.Generator
) -> None:
    """``x / scale`` saturated to +-448 and rounded to nearest even, from strided views
    of a fused qkv tensor; slots < 0 skipped."""
    from kvplane_cuda.kernels.cache import reshape_and_cache

    qkv = torch.randn(37, 3 * 4 * 64, generator=generator) * 60
    qkv[0, 256:260] = torch.tensor([1e4, -1e4, -1e-5, 3e-3])  # saturate, -0.0, subnormal
    qkv = qkv.to(input_dtype)
    key, value = qkv[:, 256:512].view(37, 4, 64), qkv[:, 512:].view(37, 4, 64)
    slot_mapping = torch.randperm(8 * 16, generator=generator)[:37]
    slot_mapping[[3, 20]] = -1
    kv_cache = (torch.randn(2, 8, 16, 4, 64, generator=generator) * 10).to(FP8_KV_DTYPE)
    expected = kv_cache.clone()
    ref.reshape_and_cache(key, value, expected, slot_mapping, *scales)
    on_device = kv_cache.to(device, copy=True)
    qkv_device = qkv.to(device)
    reshape_and_cache(
        qkv_device[:, 256:512].view(37, 4, 64),
        qkv_device[:, 512:].view(37, 4, 64),
        on_device,
        slot_mapping.to(device),
        *scales,
    )
    written = on_device.cpu()
    assert not written.float().isnan().any()
    assert torch.equal(written.view(torch.uint8), expected.view(torch.uint8))


@pytest.mark.parametrize("device", DEVICES)
def test_cache_write_of_a_float_cache_ignores_the_scales(
    device: str, generator: torch.Generator
) -> None:
    from kvplane_cuda.kernels.cache import reshape_and_cache

    key, value = torch.randn(2, 5, 2, 32, generator=generator)
    slot_mapping = torch.tensor([4, -1, 9, 0, 31])
    expected = torch.zeros(2, 2, 16, 2, 32, dtype=torch.float16)
    ref.reshape_and_cache(key, value, expected, slot_mapping)
    on_device = torch.zeros_like(expected, device=device)
    reshape_and_cache(key.to(device), value.to(device), on_device, slot_mapping.to(device), 0.5, 3)
    assert torch.equal(on_device.cpu(), expected)


# -- attention over an FP8 cache -------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scales", SCALES, ids=SCALE_IDS)
@pytest.mark.parametrize("spec_id", ["gqa-d64-b16", "gqa3-d80-b16", "window-softcap-b16"])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_over_fp8_matches_torch(
    device: str,
    scales: tuple[float, float],
    spec_id: str,
    num_splits: int,
    generator: torch.Generator,
) -> None:
    """Split-KV decode (one partition, and three merged in the split kernel)."""
    spec = fp8_spec(spec_id)
    batch = make_paged_batch_for(spec, [0, 9, 47, 95], [1, 1, 1, 1], generator)
    assert_fp8_matches(spec, batch, device, scales, num_splits)


@pytest.mark.parametrize("device", DEVICES)
def test_decode_over_fp8_with_the_separate_merge(device: str, generator: torch.Generator) -> None:
    spec = fp8_spec("mqa-d128-b32")
    batch = make_paged_batch_for(spec, [40, 0, 70], [1, 1, 1], generator)
    assert_fp8_matches(spec, batch, device, SCALES[1], num_splits=4, fused_reduce=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scales", SCALES, ids=SCALE_IDS)
@pytest.mark.parametrize("spec_id", ["gqa-d64-b16", "mha-d256-b16", "window-softcap-b16"])
def test_mixed_batches_over_fp8_match_torch(
    device: str, scales: tuple[float, float], spec_id: str, generator: torch.Generator
) -> None:
    """Prefill chunks over cached context with decodes: the unified kernel."""
    spec = fp8_spec(spec_id)
    batch = make_paged_batch_for(spec, [0, 33, 16, 5], [19, 1, 12, 1], generator)
    assert_fp8_matches(spec, batch, device, scales)


@pytest.mark.parametrize("device", DEVICES)
def test_float16_queries_over_fp8(device: str, generator: torch.Generator) -> None:
    spec = fp8_spec("gqa-d64-b16", torch.float16)
    decode = make_paged_batch_for(spec, [5, 30, 63], [1, 1, 1], generator)
    assert_fp8_matches(spec, decode, device, SCALES[1], num_splits=2)
    mixed = make_paged_batch_for(spec, [5, 30, 0], [9, 1, 4], generator)
    assert_fp8_matches(spec, mixed, device, SCALES[1])


def test_the_backend_serves_fp8_caches_where_triton_has_e4m3(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    backend = TritonAttentionBackend()
    assert backend.supports_fp8_kv_cache
    spec = dataclasses.replace(make_attention_spec(block_size=16), kv_cache_dtype=FP8_KV_DTYPE)
    if not torch.cuda.is_available() or attention.fp8_unsupported_reason() is None:
        assert backend.cannot_serve(spec) is None
    # An A100 (sm_80): Triton has no e4m3 there, so the reference serves such layers.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: (8, 0))
    reason = backend.cannot_serve(spec) or ""
    assert "needs compute capability 8.9 or newer" in reason and "this GPU is 8.0" in reason
    other = dataclasses.replace(spec, kv_cache_dtype=torch.float8_e5m2)
    assert "float8_e5m2 is not float32, float16, bfloat16 or float8_e4m3fn" in (
        backend.cannot_serve(other) or ""
    )


# -- GPU only: bfloat16 at model shapes --------------------------------------------------


@needs_gpu
@pytest.mark.parametrize("kind", ["decode", "mixed"])
def test_realistic_bfloat16_over_fp8(kind: str, generator: torch.Generator) -> None:
    spec = make_attention_spec(
        block_size=16, num_heads=32, num_kv_heads=8, head_size=128, dtype=torch.bfloat16,
        scale=128**-0.5, kv_cache_dtype=FP8_KV_DTYPE,
    )  # fmt: skip
    num_seqs = 32
    cached_lens = torch.randint(0, 4096, (num_seqs,), generator=generator).tolist()
    query_lens = [1] * num_seqs
    if kind == "mixed":
        query_lens[:4] = [256, 100, 37, 2]
    batch = make_paged_batch_for(spec, cached_lens, query_lens, generator)
    assert_fp8_matches(spec, batch, "cuda", (0.05, 0.02))
    if kind == "decode":
        assert_fp8_matches(spec, batch, "cuda", (0.05, 0.02), num_splits=7)
