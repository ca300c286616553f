"""The KV-cache write in Triton: each token's key and value go to its slot.

One program per (token, chunk of kv heads). A token whose slot is negative (padding)
masks all its loads and stores, so skipping needs no host sync and no index compaction:
the launch depends on shapes alone and is CUDA-graph capturable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: Elements (heads x channels) one program copies per tensor.
_MAX_ELEMENTS = 2048


@triton.jit
def _reshape_and_cache_kernel(
    key_ptr,
    value_ptr,
    cache_ptr,
    slot_mapping_ptr,
    key_stride_token,
    key_stride_head,
    key_stride_dim,
    value_stride_token,
    value_stride_head,
    value_stride_dim,
    cache_stride_kv,
    cache_stride_block,
    cache_stride_offset,
    cache_stride_head,
    cache_stride_dim,
    num_kv_heads,
    head_size,
    block_size,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    mask = (heads[:, None] < num_kv_heads) & (dims[None, :] < head_size) & (slot >= 0)
    key = tl.load(
        key_ptr
        + token * key_stride_token
        + heads[:, None] * key_stride_head
        + dims[None, :] * key_stride_dim,
        mask=mask,
    )
    value = tl.load(
        value_ptr
        + token * value_stride_token
        + heads[:, None] * value_stride_head
        + dims[None, :] * value_stride_dim,
        mask=mask,
    )
    block = slot // block_size
    offset = slot % block_size
    destination = (
        cache_ptr
        + block * cache_stride_block
        + offset * cache_stride_offset
        + heads[:, None] * cache_stride_head
        + dims[None, :] * cache_stride_dim
    )
    tl.store(destination, key.to(cache_ptr.dtype.element_ty), mask=mask)
    tl.store(destination + cache_stride_kv, value.to(cache_ptr.dtype.element_ty), mask=mask)


def reshape_and_cache(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_size]
    slot_mapping: torch.Tensor,  # [num_tokens] int64; slot = block * block_size + offset
) -> None:
    """Write each token's key and value at its slot, in place; slots < 0 are skipped.

    ``key`` and ``value`` may be strided views (e.g. of a fused qkv output); the cache
    may have any strides. Slots must be distinct (as the scheduler guarantees).
    """
    num_tokens = slot_mapping.shape[0]
    if num_tokens == 0:
        return
    block_size, num_kv_heads, head_size = kv_cache.shape[-3:]
    block_d = triton.next_power_of_2(head_size)
    block_h = max(1, min(triton.next_power_of_2(num_kv_heads), _MAX_ELEMENTS // block_d))
    grid = (num_tokens, triton.cdiv(num_kv_heads, block_h))
    _reshape_and_cache_kernel[grid](
        key,
        value,
        kv_cache,
        slot_mapping,
        *key.stride(),
        *value.stride(),
        *kv_cache.stride(),
        num_kv_heads,
        head_size,
        block_size,
        BLOCK_H=block_h,
        BLOCK_D=block_d,
        num_warps=4,
    )
