"""Conformance: KV-cache allocation and block copies, of the model dtypes and of the FP8
cache, and the op ``reshape_and_cache`` writing into an FP8 cache (the FP8 cases are
skipped, with the reason, where the platform's attention reads no FP8 cache)."""

from __future__ import annotations

import pytest
import torch

from kvplane.ops import reference
from kvplane.ops.steps import byte_view
from kvplane.plugins import Platform
from kvplane.plugins.types import BlockCopyRequest, KVCacheSpec
from kvplane.testing.helpers import (
    FP8_KV_DTYPE,
    fp8_kv_cache_backend,
    make_attention_spec,
    randn,
)


@pytest.mark.parametrize(("block_size", "num_kv_heads", "head_size"), [(16, 2, 64), (32, 1, 128)])
def test_allocate_kv_cache(
    kvplane_platform: Platform,
    kvplane_device: torch.device,
    kvplane_dtype: torch.dtype,
    block_size: int,
    num_kv_heads: int,
    head_size: int,
) -> None:
    spec = KVCacheSpec(7, block_size, num_kv_heads, head_size, kvplane_dtype, kvplane_device)
    kv_cache = kvplane_platform.allocate_kv_cache(spec)
    assert isinstance(kv_cache, torch.Tensor)
    assert tuple(kv_cache.shape) == spec.shape
    assert kv_cache.dtype == kvplane_dtype
    assert kv_cache.device.type == kvplane_device.type
    assert kv_cache.is_contiguous(), "backends view the cache as [2, num_slots, ...]"
    assert kv_cache[:, 0].numel() * kv_cache.element_size() == spec.bytes_per_block
    # The memory is usable: what is written reads back.
    kv_cache.fill_(1.5)
    assert bool((kv_cache == 1.5).all())


@pytest.mark.parametrize("block_size", [16, 32])
def test_copy_blocks(
    kvplane_platform: Platform,
    kvplane_device: torch.device,
    kvplane_dtype: torch.dtype,
    kvplane_generator: torch.Generator,
    block_size: int,
) -> None:
    num_layers, num_blocks, num_kv_heads, head_size = 3, 8, 2, 64
    caches = [
        randn(
            (2, num_blocks, block_size, num_kv_heads, head_size), kvplane_dtype, kvplane_generator
        )
        for _ in range(num_layers)
    ]
    # Copy-on-write: a shared source may be copied to several fresh blocks.
    src_block_ids, dst_block_ids = (0, 3, 3, 5), (1, 6, 2, 4)
    device_caches = tuple(cache.to(kvplane_device, copy=True) for cache in caches)
    kvplane_platform.copy_blocks(BlockCopyRequest(device_caches, src_block_ids, dst_block_ids))
    for layer, (cache, device_cache) in enumerate(zip(caches, device_caches, strict=True)):
        expected = cache.clone()
        for src, dst in zip(src_block_ids, dst_block_ids, strict=True):
            expected[:, dst] = cache[:, src]
        assert torch.equal(device_cache.cpu(), expected), f"layer {layer} after copy_blocks"


def test_copy_blocks_with_nothing_to_copy(
    kvplane_platform: Platform,
    kvplane_device: torch.device,
    kvplane_dtypes: tuple[torch.dtype, ...],
    kvplane_generator: torch.Generator,
) -> None:
    cache = randn((2, 3, 16, 1, 64), kvplane_dtypes[0], kvplane_generator)
    device_cache = cache.to(kvplane_device, copy=True)
    kvplane_platform.copy_blocks(BlockCopyRequest((device_cache,), (), ()))
    assert torch.equal(device_cache.cpu(), cache)


def _skip_without_fp8(platform: Platform, dtypes: tuple[torch.dtype, ...]) -> None:
    spec = make_attention_spec(dtype=dtypes[0], block_size=16, kv_cache_dtype=FP8_KV_DTYPE)
    fp8_kv_cache_backend(platform, spec)


def test_allocate_fp8_kv_cache(
    kvplane_platform: Platform,
    kvplane_device: torch.device,
    kvplane_dtypes: tuple[torch.dtype, ...],
) -> None:
    _skip_without_fp8(kvplane_platform, kvplane_dtypes)
    spec = KVCacheSpec(7, 16, 2, 64, FP8_KV_DTYPE, kvplane_device)
    float_spec = KVCacheSpec(7, 16, 2, 64, torch.bfloat16, kvplane_device)
    assert spec.bytes_per_block * 2 == float_spec.bytes_per_block  # one byte an element
    kv_cache = kvplane_platform.allocate_kv_cache(spec)
    assert tuple(kv_cache.shape) == spec.shape and kv_cache.dtype == FP8_KV_DTYPE
    assert kv_cache.is_contiguous()
    assert kv_cache[:, 0].numel() * kv_cache.element_size() == spec.bytes_per_block
    kv_cache.fill_(1.5)
    assert bool((kv_cache.float() == 1.5).all())


def test_copy_fp8_blocks(
    kvplane_platform: Platform,
    kvplane_device: torch.device,
    kvplane_dtypes: tuple[torch.dtype, ...],
    kvplane_generator: torch.Generator,
) -> None:
    _skip_without_fp8(kvplane_platform, kvplane_dtypes)
    cache = randn((2, 8, 16, 2, 64), FP8_KV_DTYPE, kvplane_generator)
    device_cache = cache.to(kvplane_device, copy=True)
    src_block_ids, dst_block_ids = (0, 3, 3), (1, 6, 2)
    kvplane_platform.copy_blocks(BlockCopyRequest((device_cache,), src_block_ids, dst_block_ids))
    expected = byte_view(cache).clone()  # torch has no float8 indexing on the CPU
    for src, dst in zip(src_block_ids, dst_block_ids, strict=True):
        expected[:, dst] = byte_view(cache)[:, src]
    assert torch.equal(byte_view(device_cache.cpu()), expected), "FP8 blocks copied bit for bit"


@pytest.mark.parametrize(("k_scale", "v_scale"), [(1.0, 1.0), (0.25, 2.0)])
def test_reshape_and_cache_into_fp8(
    kvplane_platform: Platform,
    kvplane_device: torch.device,
    kvplane_dtype: torch.dtype,
    kvplane_generator: torch.Generator,
    k_scale: float,
    v_scale: float,
) -> None:
    """An FP8 cache stores ``x / scale`` saturated to +-448 (never NaN), rounded to the
    nearest e4m3 value; skipped where the platform's attention reads no FP8 cache."""
    fp8_kv_cache_backend(
        kvplane_platform,
        make_attention_spec(dtype=kvplane_dtype, block_size=16, kv_cache_dtype=FP8_KV_DTYPE),
    )
    gen = kvplane_generator
    num_tokens, num_blocks, block_size, num_kv_heads, head_size = 23, 6, 16, 4, 128
    key = randn((num_tokens, num_kv_heads, head_size), torch.float32, gen, scale=8.0)
    key[0, 0, :4] = torch.tensor([1e4, -1e4, 300.0, -3e-4])  # saturated; rounded; -0.0
    key = key.to(kvplane_dtype)
    value = randn((num_tokens, num_kv_heads, head_size), kvplane_dtype, gen, scale=0.01)
    kv_cache = randn((2, num_blocks, block_size, num_kv_heads, head_size), FP8_KV_DTYPE, gen)
    slot_mapping = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slot_mapping[1] = -1

    cache_device = kv_cache.to(kvplane_device, copy=True)
    kvplane_platform.ops.reshape_and_cache(
        key.to(kvplane_device, copy=True),
        value.to(kvplane_device, copy=True),
        cache_device,
        slot_mapping.to(kvplane_device, copy=True),
        k_scale,
        v_scale,
    )
    expected = kv_cache.clone()
    reference.reshape_and_cache(key, value, expected, slot_mapping, k_scale, v_scale)
    written = cache_device.cpu()
    assert not written.float().isnan().any(), "out-of-range values must saturate, not be NaN"
    first_slot = int(slot_mapping[0])
    first_key = written.view(2, -1, num_kv_heads, head_size)[0, first_slot, 0, :2].float()
    assert first_key.tolist() == [448.0, -448.0]
    assert torch.equal(byte_view(written), byte_view(expected)), (
        "reshape_and_cache into an FP8 cache must store x / scale as the reference rounds it"
    )
