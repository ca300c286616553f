"""Rotary position embedding in Triton, rotating query and key in place.

One program per token: it reads the token's cos/sin row once and rotates every query
and key head with it, a chunk of heads at a time. Query and key may be strided views
(rows of a fused qkv output): every stride is a kernel argument, nothing is copied.
Channels past ``rotary_dim`` are never touched. The table's rows may carry any rope
scaling (llama3, yarn, longrope, ...): that lives in how the core builds the table.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: Elements (heads x channel pairs) one program rotates at a time.
_MAX_ELEMENTS = 2048


@triton.jit
def _rotate_heads(
    x_ptr,  # this token's first head
    num_heads: tl.constexpr,
    stride_head,
    stride_dim,
    first,  # [BLOCK_HALF] channel of each pair's first element
    second,  # [BLOCK_HALF] channel of each pair's second element
    cos,  # [BLOCK_HALF] float32
    sin,  # [BLOCK_HALF] float32
    pair_mask,  # [BLOCK_HALF]
    BLOCK_H: tl.constexpr,
):
    head_offsets = tl.arange(0, BLOCK_H)
    for head_start in range(0, num_heads, BLOCK_H):
        heads = head_start + head_offsets
        mask = (heads[:, None] < num_heads) & pair_mask[None, :]
        row = x_ptr + heads[:, None] * stride_head
        first_ptrs = row + first[None, :] * stride_dim
        second_ptrs = row + second[None, :] * stride_dim
        x1 = tl.load(first_ptrs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(second_ptrs, mask=mask, other=0.0).to(tl.float32)
        out1 = x1 * cos[None, :] - x2 * sin[None, :]
        out2 = x2 * cos[None, :] + x1 * sin[None, :]
        tl.store(first_ptrs, out1.to(x_ptr.dtype.element_ty), mask=mask)
        tl.store(second_ptrs, out2.to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    positions_ptr,
    query_ptr,
    key_ptr,
    cos_sin_ptr,
    query_stride_token,
    query_stride_head,
    query_stride_dim,
    key_stride_token,
    key_stride_head,
    key_stride_dim,
    cos_sin_stride_position,
    cos_sin_stride_dim,
    num_heads: tl.constexpr,
    num_kv_heads: tl.constexpr,
    half_rotary_dim,
    IS_NEOX_STYLE: tl.constexpr,
    BLOCK_Q_HEADS: tl.constexpr,
    BLOCK_KV_HEADS: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    position = tl.load(positions_ptr + token).to(tl.int64)
    pairs = tl.arange(0, BLOCK_HALF)
    pair_mask = pairs < half_rotary_dim
    table_row = cos_sin_ptr + position * cos_sin_stride_position
    cos = tl.load(table_row + pairs * cos_sin_stride_dim, mask=pair_mask, other=0.0)
    sin = tl.load(
        table_row + (half_rotary_dim + pairs) * cos_sin_stride_dim, mask=pair_mask, other=0.0
    )
    cos = cos.to(tl.float32)
    sin = sin.to(tl.float32)
    if IS_NEOX_STYLE:  # the two halves of the rotary channels rotate against each other
        first = pairs
        second = pairs + half_rotary_dim
    else:  # GPT-J: interleaved pairs (2i, 2i + 1)
        first = 2 * pairs
        second = 2 * pairs + 1
    _rotate_heads(
        query_ptr + token * query_stride_token,
        num_heads,
        query_stride_head,
        query_stride_dim,
        first,
        second,
        cos,
        sin,
        pair_mask,
        BLOCK_Q_HEADS,
    )
    _rotate_heads(
        key_ptr + token * key_stride_token,
        num_kv_heads,
        key_stride_head,
        key_stride_dim,
        first,
        second,
        cos,
        sin,
        pair_mask,
        BLOCK_KV_HEADS,
    )


def rotary_embedding(
    positions: torch.Tensor,  # [num_tokens] int64
    query: torch.Tensor,  # [num_tokens, num_heads, head_size]
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
    cos_sin_cache: torch.Tensor,  # [max_position, rotary_dim] = cat(cos, sin) halves
    is_neox_style: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate the first ``rotary_dim`` channels of each head by its position's angles,
    in place; returns ``(query, key)``, the very tensors passed in.

    Same values as :func:`kvplane.ops.reference.rotary_embedding` (float32 math, one
    rounding to the input dtype); the callers never reuse the unrotated inputs.
    """
    num_tokens, num_heads, _ = query.shape
    num_kv_heads = key.shape[1]
    half_rotary_dim = cos_sin_cache.shape[-1] // 2
    if num_tokens == 0 or half_rotary_dim == 0:
        return query, key
    block_half = triton.next_power_of_2(half_rotary_dim)
    max_block_heads = max(1, _MAX_ELEMENTS // block_half)
    _rotary_kernel[(num_tokens,)](
        positions,
        query,
        key,
        cos_sin_cache,
        *query.stride(),
        *key.stride(),
        *cos_sin_cache.stride(),
        num_heads,
        num_kv_heads,
        half_rotary_dim,
        IS_NEOX_STYLE=is_neox_style,
        BLOCK_Q_HEADS=min(triton.next_power_of_2(num_heads), max_block_heads),
        BLOCK_KV_HEADS=min(triton.next_power_of_2(num_kv_heads), max_block_heads),
        BLOCK_HALF=block_half,
        num_warps=4,
    )
    return query, key
