"""Conformance: KV-cache allocation and block copies."""

from __future__ import annotations

import pytest
import torch

from kvplane.plugins import Platform
from kvplane.plugins.types import BlockCopyRequest, KVCacheSpec
from kvplane.testing.helpers import randn


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
