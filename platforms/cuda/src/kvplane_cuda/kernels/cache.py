"""The KV-cache write in Triton: each token's key and value go to its slot.

One program per (token, chunk of kv heads). A token whose slot is negative (padding)
masks all its loads and stores, so skipping needs no host sync and no index compaction:
the launch depends on shapes alone and is CUDA-graph capturable.

An FP8 (float8_e4m3fn) cache stores ``x / scale`` saturated to +-448 and rounded to the
nearest e4m3 value, ties to even, as :func:`kvplane.ops.steps.quantize_kv` does: a bare
cast of a larger value would give NaN, and the rounding is spelled out
(:func:`.fp8_quant.round_to_e4m3_grid`) so the interpreter stores the same codes as the
GPU. A float cache compiles without any of it (``QUANTIZE`` is a constexpr).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvplane.ops import steps
from kvplane_cuda.kernels.fp8_quant import round_to_e4m3_grid

#: Elements (heads x channels) one program copies per tensor.
_MAX_ELEMENTS = 2048
#: Largest finite e4m3 value: FP8 writes saturate to it.
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max


@triton.jit
def _quantize(x, scale, FP8_MAX_VALUE: tl.constexpr):
    # IEEE division, as torch divides: the GPU's default "/" is approximate.
    scaled = tl.clamp(tl.div_rn(x.to(tl.float32), scale), -FP8_MAX_VALUE, FP8_MAX_VALUE)
    return round_to_e4m3_grid(scaled)


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
    k_scale,
    v_scale,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    QUANTIZE: tl.constexpr,
    FP8_MAX_VALUE: tl.constexpr,
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
    if QUANTIZE:
        key = _quantize(key, k_scale, FP8_MAX_VALUE)
        value = _quantize(value, v_scale, FP8_MAX_VALUE)
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
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Write each token's key and value at its slot, in place; slots < 0 are skipped.

    ``key`` and ``value`` may be strided views (e.g. of a fused qkv output); the cache
    may have any strides. Slots must be distinct (as the scheduler guarantees). An FP8
    cache gets ``key / k_scale`` and ``value / v_scale`` saturated; a float cache
    ignores the scales.
    """
    num_tokens = slot_mapping.shape[0]
    if num_tokens == 0:
        return
    block_size, num_kv_heads, head_size = kv_cache.shape[-3:]
    block_d = triton.next_power_of_2(head_size)
    block_h = max(1, min(triton.next_power_of_2(num_kv_heads), _MAX_ELEMENTS // block_d))
    grid = (num_tokens, triton.cdiv(num_kv_heads, block_h))
    quantize = steps.is_quantized_kv_cache(kv_cache.dtype)
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
        float(k_scale),  # floats, never ints: Triton would specialise an int 1
        float(v_scale),
        BLOCK_H=block_h,
        BLOCK_D=block_d,
        QUANTIZE=quantize,
        FP8_MAX_VALUE=FP8_MAX,
        num_warps=4,
    )
