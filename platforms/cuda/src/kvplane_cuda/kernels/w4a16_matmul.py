"""W4A16 matmul in Triton: ``x @ W.T`` with ``W`` read as packed int4 (GPTQ or AWQ layout).

Each program computes a ``[BLOCK_M, BLOCK_N]`` output tile, looping over ``K`` in
``BLOCK_K`` steps: it loads the int32 words of one weight tile, unpacks the nibbles in
registers, subtracts the zero points and (where the tile is one group) multiplies the
integer tile with ``x`` on tensor cores before scaling the partial sum per column, or (with
act-order or groups that split a tile) gathers each row's scale and zero and feeds the
dequantized tile to ``tl.dot``. The float weight is never materialized; accumulation is
float32. Layout facts are in :mod:`kvplane.quantization.int4_packing`; the result matches
:func:`kvplane.quantization.int4_packing.w4a16_linear_reference` within matmul tolerance.

Two configurations: decode (``T <= 16`` tokens, one ``BLOCK_M = 16`` row tile) splits
``K`` over a third grid axis so a small batch still fills the GPU, writing float32 partial
sums that one torch reduction adds; prefill uses wider tiles and no split.

What only a GPU run can verify: that every configuration compiles for sm_90 at model
shapes (register and shared-memory limits of the unpacking reshapes), and the speed; the
tile sizes here are first guesses, untuned. The CPU tests run the kernel in Triton's
interpreter on small shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kvplane.quantization.int4_packing import check_w4a16_shapes

#: Largest token count that takes the decode (split-K) configuration.
DECODE_MAX_TOKENS = 16
#: Programs the decode split aims for: a couple of waves on a 132-SM H100. A constant,
#: not a device query, so the choice is the same on every device and in the interpreter.
_DECODE_TARGET_PROGRAMS = 256
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _expand_columns(words, ROWS: tl.constexpr, COLS: tl.constexpr):
    """[ROWS, COLS / 8] words -> [ROWS, COLS], each word repeated for its 8 columns."""
    wide = tl.broadcast_to(words[:, :, None], (ROWS, COLS // 8, 8))
    return tl.reshape(wide, (ROWS, COLS))


@triton.jit
def _unpack_weight_tile(
    qweight_ptr,
    k0,
    N,
    K,
    offs_n,
    mask_n,
    offs_nw,
    mask_nw,
    n_shift,
    IS_AWQ: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """The int4 values [BLOCK_K, BLOCK_N] (int32) of input rows ``k0..`` and columns
    ``offs_n``; each word is loaded once and its nibbles are spread in registers."""
    if IS_AWQ:  # [K, N / 8]: a word holds 8 columns of one row
        offs_k = k0 + tl.arange(0, BLOCK_K)
        words = tl.load(
            qweight_ptr + offs_k[:, None] * (N // 8) + offs_nw[None, :],
            mask=(offs_k < K)[:, None] & mask_nw[None, :],
            other=0,
        )  # [BLOCK_K, BLOCK_N / 8]
        q = (_expand_columns(words, BLOCK_K, BLOCK_N) >> n_shift[None, :]) & 0xF
    else:  # [K / 8, N]: a word holds 8 rows of one column, row 8r + i in nibble i
        offs_kw = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        words = tl.load(
            qweight_ptr + offs_kw[:, None] * N + offs_n[None, :],
            mask=(offs_kw < K // 8)[:, None] & mask_n[None, :],
            other=0,
        )  # [BLOCK_K / 8, BLOCK_N]
        wide = tl.broadcast_to(words[:, None, :], (BLOCK_K // 8, 8, BLOCK_N))
        k_shift = (tl.arange(0, BLOCK_K) % 8) * 4
        q = (tl.reshape(wide, (BLOCK_K, BLOCK_N)) >> k_shift[:, None]) & 0xF
    return q


@triton.jit
def _load_group_params(
    qzeros_ptr,
    scales_ptr,
    groups,
    row_mask,
    N,
    offs_n,
    mask_n,
    offs_nw,
    mask_nw,
    n_shift,
    zeros_offset,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Zero points (int32, offset added) and scales (float32), both [ROWS, BLOCK_N], of
    ``groups`` [ROWS] for the program's columns."""
    zero_words = tl.load(
        qzeros_ptr + groups[:, None] * (N // 8) + offs_nw[None, :],
        mask=row_mask[:, None] & mask_nw[None, :],
        other=0,
    )  # [ROWS, BLOCK_N / 8]
    zeros = ((_expand_columns(zero_words, ROWS, BLOCK_N) >> n_shift[None, :]) & 0xF) + zeros_offset
    scales = tl.load(
        scales_ptr + groups[:, None] * N + offs_n[None, :],
        mask=row_mask[:, None] & mask_n[None, :],
        other=0.0,
    )
    return zeros, scales.to(tl.float32)


@triton.jit
def _w4a16_kernel(
    x_ptr,
    stride_xm,
    stride_xk,
    qweight_ptr,
    qzeros_ptr,
    scales_ptr,
    g_idx_ptr,
    out_ptr,
    stride_os,
    stride_om,
    stride_on,
    M,
    N,
    K,
    group_size,
    zeros_offset,
    k_tiles_per_split,
    IS_AWQ: tl.constexpr,
    HAS_G_IDX: tl.constexpr,
    ONE_GROUP_PER_TILE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)  # which slice of K (split-K), 0 without a split
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_nw = pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)  # word columns
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask_nw = offs_nw < N // 8
    # Nibble of each output column inside its word: in order for GPTQ's qzeros, while
    # AWQ's column 8c + j sits in nibble (0, 4, 1, 5, 2, 6, 3, 7)[j] of qweight and qzeros.
    column = tl.arange(0, BLOCK_N) % 8
    if IS_AWQ:
        n_shift = ((column % 2) * 4 + column // 2) * 4
    else:
        n_shift = column * 4
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    dot_dtype = x_ptr.dtype.element_ty

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_first = pid_s * k_tiles_per_split * BLOCK_K
    for tile in range(0, k_tiles_per_split):
        k0 = k_first + tile * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(
            x_rows + offs_k[None, :] * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0.0
        )  # [BLOCK_M, BLOCK_K]
        q = _unpack_weight_tile(
            qweight_ptr,
            k0,
            N,
            K,
            offs_n,
            mask_n,
            offs_nw,
            mask_nw,
            n_shift,
            IS_AWQ,
            BLOCK_K,
            BLOCK_N,
        )  # [BLOCK_K, BLOCK_N]
        if ONE_GROUP_PER_TILE:
            # One group for the whole tile: the integers q - z (exact in any dot dtype) go
            # through the tensor cores, and the column scales multiply the float32 sum.
            group = tl.zeros((1,), dtype=tl.int32) + k0 // group_size
            zeros, scales = _load_group_params(
                qzeros_ptr,
                scales_ptr,
                group,
                group >= 0,
                N,
                offs_n,
                mask_n,
                offs_nw,
                mask_nw,
                n_shift,
                zeros_offset,
                1,
                BLOCK_N,
            )  # [1, BLOCK_N] each
            # Via float32 (exact for these small integers): Triton's interpreter casts
            # int32 to bfloat16 wrongly.
            centered = (q - zeros).to(tl.float32).to(dot_dtype)
            acc += tl.dot(x, centered) * scales
        else:
            # Act-order or groups narrower than the tile: each row gathers its group's.
            if HAS_G_IDX:
                groups = tl.load(g_idx_ptr + offs_k, mask=mask_k, other=0)
            else:
                groups = offs_k // group_size
            zeros, scales = _load_group_params(
                qzeros_ptr,
                scales_ptr,
                groups,
                mask_k,
                N,
                offs_n,
                mask_n,
                offs_nw,
                mask_nw,
                n_shift,
                zeros_offset,
                BLOCK_K,
                BLOCK_N,
            )  # [BLOCK_K, BLOCK_N] each
            weight = ((q - zeros).to(tl.float32) * scales).to(dot_dtype)
            acc = tl.dot(x, weight, acc)

    out = out_ptr + pid_s * stride_os + offs_m.to(tl.int64)[:, None] * stride_om
    tl.store(
        out + offs_n[None, :] * stride_on,
        acc.to(out_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_n[None, :],
    )


@dataclass(frozen=True, slots=True)
class _Config:
    block_m: int
    block_n: int
    block_k: int
    split_k: int
    k_tiles_per_split: int
    one_group_per_tile: bool
    num_warps: int
    num_stages: int


def _pick_config(
    num_tokens: int, input_size: int, output_size: int, group_size: int, has_g_idx: bool
) -> _Config:
    is_decode = num_tokens <= DECODE_MAX_TOKENS
    block_m = 16 if is_decode else 64
    block_n = 64 if is_decode else 128
    widest_k = 128 if is_decode else 64
    # The widest BLOCK_K that divides the group size makes each K tile a single group
    # (tiles start at multiples of BLOCK_K); otherwise rows gather their own group.
    block_k = next((k for k in (128, 64, 32) if k <= widest_k and group_size % k == 0), 32)
    one_group = not has_g_idx and group_size % block_k == 0
    k_tiles = triton.cdiv(input_size, block_k)
    split_k = 1
    if is_decode:
        tiles = triton.cdiv(num_tokens, block_m) * triton.cdiv(output_size, block_n)
        split_k = max(1, min(k_tiles, _DECODE_TARGET_PROGRAMS // tiles))
    k_tiles_per_split = triton.cdiv(k_tiles, split_k)
    split_k = triton.cdiv(k_tiles, k_tiles_per_split)  # no empty splits
    return _Config(
        block_m=block_m,
        block_n=block_n,
        block_k=block_k,
        split_k=split_k,
        k_tiles_per_split=k_tiles_per_split,
        one_group_per_tile=one_group,
        num_warps=4,
        num_stages=3 if is_decode else 2,
    )


def w4a16_matmul(
    x: torch.Tensor,  # [..., K] float16, bfloat16 or float32
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None = None,  # [K], GPTQ act-order only
    *,
    layout: str,
    group_size: int,
    zeros_offset: int,
) -> torch.Tensor:  # [..., N], x.dtype
    """``x @ W.T`` for an int4 weight packed as ``layout`` ("gptq" or "awq").

    ``group_size`` is the checkpoint's (``-1``: one group); ``zeros_offset`` is added to
    each stored zero point: 1 for GPTQ v1 checkpoints, 0 for GPTQ v2 and AWQ. Pass
    ``g_idx`` only for act-order GPTQ layers (a sequential ``g_idx`` is implied when it is
    ``None``, and skipping the gather is faster: see
    :func:`~kvplane.quantization.int4_packing.is_sequential_g_idx`). Allocates the output
    (and, for few tokens, a float32 split-K buffer); no host sync, so it can be captured in
    a CUDA graph. Inputs are not modified. No bias: the caller adds it.
    """
    if layout not in ("gptq", "awq"):
        raise ValueError(f"layout must be 'gptq' or 'awq', got {layout!r}")
    if zeros_offset not in (0, 1) or (layout == "awq" and zeros_offset != 0):
        raise ValueError(f"zeros_offset must be 0 or 1 (0 for AWQ), got {zeros_offset}")
    shape = check_w4a16_shapes(layout, qweight, qzeros, scales, g_idx, group_size)
    assert shape.group_size is not None
    if x.dtype not in _DTYPES:
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.shape[-1] != shape.input_size:
        raise ValueError(f"x must have shape [..., {shape.input_size}], got {list(x.shape)}")
    tensors = [qweight, qzeros, scales] + ([] if g_idx is None else [g_idx])
    if any(tensor.device != x.device for tensor in tensors):
        raise ValueError("x and the packed weight tensors must be on the same device")

    rows = x.reshape(-1, shape.input_size)  # [num_tokens, K]
    num_tokens = rows.shape[0]
    out = torch.empty(num_tokens, shape.output_size, dtype=x.dtype, device=x.device)
    if num_tokens == 0:
        return out.view(*x.shape[:-1], shape.output_size)
    config = _pick_config(
        num_tokens, shape.input_size, shape.output_size, shape.group_size, g_idx is not None
    )
    if config.split_k > 1:  # [split_k, num_tokens, N] float32 partial sums
        target = torch.empty(
            config.split_k, num_tokens, shape.output_size, dtype=torch.float32, device=x.device
        )
    else:
        target = out.unsqueeze(0)
    grid = (
        triton.cdiv(num_tokens, config.block_m),
        triton.cdiv(shape.output_size, config.block_n),
        config.split_k,
    )
    _w4a16_kernel[grid](
        rows,
        rows.stride(0),
        rows.stride(1),
        qweight.contiguous(),
        qzeros.contiguous(),
        scales.contiguous(),
        qweight if g_idx is None else g_idx.to(torch.int32).contiguous(),  # unread when None
        target,
        target.stride(0),
        target.stride(1),
        target.stride(2),
        num_tokens,
        shape.output_size,
        shape.input_size,
        shape.group_size,
        zeros_offset,
        config.k_tiles_per_split,
        IS_AWQ=layout == "awq",
        HAS_G_IDX=g_idx is not None,
        ONE_GROUP_PER_TILE=config.one_group_per_tile,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    if config.split_k > 1:
        out = target.sum(dim=0).to(x.dtype)  # [num_tokens, N], rounded once
    return out.view(*x.shape[:-1], shape.output_size)
