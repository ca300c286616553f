"""``x @ W.T`` for a GGUF-quantized ``W``, dequantized tile by tile inside the K loop.

The weight stays in GGUF's own bytes (``uint8 [N, bytes_per_row]``, see
:mod:`kvplane.quantization.gguf_blocks`); the float weight is never materialised. Each
program owns a ``[BLOCK_T, BLOCK_N]`` output tile; per step of ``BLOCK_K`` columns it
loads the ``x`` tile, decodes the ``[BLOCK_K, BLOCK_N]`` weight tile from the bytes in
float32 (the same operations, in the same order, as the torch reference), rounds it to
``x.dtype`` and accumulates ``tl.dot`` in float32. ``BLOCK_K`` divides the format's block
size, so every tile lies inside one GGUF block per row: the per-block fields (``d``,
``dmin``) are loaded once per row, only the codes (and the K-quants' sub-block scales)
per weight. The format is a ``constexpr``: one specialisation per format and tile shape.

Half-precision fields are assembled from two byte loads, so no load needs 2-byte
alignment (a Q4_1 block is 20 bytes, Q6_K's ``d`` sits at byte 208 of 210).

Verified on the CPU under the Triton interpreter (small shapes) and compiled on an H100
(all formats, float32/float16/bfloat16, model-sized shapes match the reference). Only a
GPU can verify compilation and rounding (the compiler may fuse ``a * b - c`` into one
FMA: a last-bit float32 difference before the weights are rounded to ``x.dtype``) and
speed. The kernel is untuned (per-element byte gathers and short K steps bound it;
timings in ``docs/performance.md``), so callers use it for small steps only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvplane.quantization.gguf_blocks import GGUFBlockFormat, gguf_block_format, validate_raw

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _f16(ptr):  # byte pointers -> float32, from two loads of the little-endian half
    low = tl.load(ptr).to(tl.uint16)
    high = tl.load(ptr + 1).to(tl.uint16)
    return (low | (high << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _byte(ptr):  # byte pointers -> int32 in [0, 255]
    return tl.load(ptr).to(tl.int32)


@triton.jit
def _k_affine(block, sub, q):
    """Q4_K/Q5_K: ``(d * scale) * q - dmin * min`` for codes ``q`` of sub-block ``sub``.

    The 6-bit scale and min of sub-blocks 0-3 are the low 6 bits of bytes ``sub`` and
    ``sub + 4`` of the 12 scale bytes; sub-blocks 4-7 take a nibble of byte ``sub + 4``
    (scale low, min high) plus the top 2 bits of bytes ``sub - 4`` (scale) and ``sub`` (min).
    """
    first = _byte(block + 4 + sub)
    second = _byte(block + 8 + sub)
    spare = _byte(block + 4 + sub % 4)
    is_low = sub < 4
    scale = tl.where(is_low, first & 63, (second & 15) | ((spare >> 6) << 4))
    minimum = tl.where(is_low, second & 63, (second >> 4) | ((first >> 6) << 4))
    sub_scale = _f16(block) * scale.to(tl.float32)
    return sub_scale * q.to(tl.float32) - _f16(block + 2) * minimum.to(tl.float32)


@triton.jit
def _dequantize_tile(block, i, FORMAT: tl.constexpr):
    """Weights at index ``i`` ([BLOCK_K, 1]) of the blocks at ``block`` ([1, BLOCK_N]
    byte pointers), float32 [BLOCK_K, BLOCK_N]. Same float32 steps as the reference.

    ``FORMAT`` is the GGML type id (:attr:`GGUFBlockFormat.type_id`)."""
    if FORMAT == 2:  # Q4_0: d, 16 bytes of nibbles (weights 0-15 low, 16-31 high)
        q = (_byte(block + 2 + i % 16) >> (4 * (i // 16))) & 15
        w = _f16(block) * (q - 8).to(tl.float32)
    elif FORMAT == 3:  # Q4_1: d, m, nibbles as Q4_0
        q = (_byte(block + 4 + i % 16) >> (4 * (i // 16))) & 15
        w = _f16(block) * q.to(tl.float32) + _f16(block + 2)
    elif FORMAT == 8:  # Q8_0: d, 32 int8 codes
        q = tl.load(block + 2 + i).to(tl.int8, bitcast=True)
        w = q.to(tl.float32) * _f16(block)
    elif FORMAT == 12:  # Q4_K: d, dmin, 12 scale bytes, 128 bytes of nibbles
        # 32-byte group c = i // 64 holds sub-block 2c (low nibbles) and 2c + 1 (high).
        shift = 4 * ((i // 32) % 2)
        q = (_byte(block + 16 + (i // 64) * 32 + i % 32) >> shift) & 15
        w = _k_affine(block, i // 32, q)
    elif FORMAT == 13:  # Q5_K: as Q4_K with 32 bytes of fifth bits before the nibbles
        shift = 4 * ((i // 32) % 2)
        low = (_byte(block + 48 + (i // 64) * 32 + i % 32) >> shift) & 15
        high = (_byte(block + 16 + i % 32) >> (i // 32)) & 1
        w = _k_affine(block, i // 32, low | (high << 4))
    else:  # Q6_K: 128 bytes low nibbles, 64 bytes 2-bit highs, 16 int8 scales, d
        half = i // 128
        r = i % 128
        low = (_byte(block + half * 64 + r % 64) >> (4 * (r // 64))) & 15
        high = (_byte(block + 128 + half * 32 + r % 32) >> (2 * (r // 32))) & 3
        q = (low | (high << 4)).to(tl.float32) - 32.0
        scale = tl.load(block + 192 + i // 16).to(tl.int8, bitcast=True).to(tl.float32)
        w = (_f16(block + 208) * scale) * q
    return w


@triton.jit
def _gguf_matmul_kernel(
    x_ptr,
    x_row_stride,
    w_ptr,
    w_row_stride,
    out_ptr,
    out_row_stride,
    num_tokens,
    num_rows,
    num_columns,
    FORMAT: tl.constexpr,
    WEIGHTS_PER_BLOCK: tl.constexpr,
    BYTES_PER_BLOCK: tl.constexpr,
    IEEE_DOT: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    # Clamped indices keep every load in bounds without masks; only the store is masked.
    safe_tokens = tl.minimum(tokens, num_tokens - 1).to(tl.int64)
    safe_rows = tl.minimum(rows, num_rows - 1).to(tl.int64)
    x_rows = x_ptr + safe_tokens[:, None] * x_row_stride  # [BLOCK_T, 1]
    w_rows = w_ptr + safe_rows[None, :] * w_row_stride  # [1, BLOCK_N]
    k_offsets = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for k_start in range(0, num_columns, BLOCK_K):
        x = tl.load(x_rows + k_start + k_offsets[None, :])  # [BLOCK_T, BLOCK_K]
        # BLOCK_K divides the block size: the whole tile lies in one block of each row.
        block = w_rows + (k_start // WEIGHTS_PER_BLOCK) * BYTES_PER_BLOCK  # [1, BLOCK_N]
        i = k_start % WEIGHTS_PER_BLOCK + k_offsets[:, None]  # [BLOCK_K, 1]
        w = _dequantize_tile(block, i, FORMAT).to(x.dtype)  # [BLOCK_K, BLOCK_N]
        if IEEE_DOT:  # float32 input: no TF32, like torch's default matmul
            acc = tl.dot(x, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w, acc)
    out = out_ptr + tokens.to(tl.int64)[:, None] * out_row_stride + rows[None, :]
    mask = (tokens[:, None] < num_tokens) & (rows[None, :] < num_rows)
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _tiles(num_tokens: int, weights_per_block: int) -> tuple[int, int, int, int]:
    """``(BLOCK_T, BLOCK_N, BLOCK_K, num_warps)``: narrow output tiles for decode (more
    programs over N when there is one token), square ones for prefill. Untuned."""
    block_k = 32 if weights_per_block == 32 else 64
    if num_tokens <= 16:
        return 16, 32, block_k, 4
    return 64, 64, block_k, 4


def gguf_matmul(
    x: torch.Tensor,  # [num_tokens, K] float16 / bfloat16 / float32
    raw: torch.Tensor,  # [N, bytes_per_row] uint8, GGUF blocks of a [N, K] weight
    fmt: GGUFBlockFormat | int | str,
    num_columns: int | None = None,
) -> torch.Tensor:  # [num_tokens, N] in x.dtype
    """``x @ W.T`` with ``W`` dequantized from ``raw`` inside the kernel.

    ``num_columns`` (default ``x.shape[1]``) is ``W``'s K and must be whole blocks of the
    format (32 or 256 weights). Weights are rounded to ``x.dtype`` before the matrix unit,
    sums are float32 (IEEE, not TF32, for float32 ``x``): the contract of
    :func:`kvplane.quantization.gguf_blocks.gguf_linear_reference`. Neither input is
    modified. Raises ValueError for inputs that do not fit together.
    """
    fmt = gguf_block_format(fmt)
    if x.dim() != 2 or x.dtype not in _DTYPES:
        raise ValueError(f"x must be 2-D float16/bfloat16/float32, got {tuple(x.shape)} {x.dtype}")
    num_columns = x.shape[1] if num_columns is None else num_columns
    if num_columns != x.shape[1]:
        raise ValueError(f"x has {x.shape[1]} columns but the weight has {num_columns}")
    if raw.dim() != 2:
        raise ValueError(f"GGUF weight bytes must be 2-D [rows, bytes], got {tuple(raw.shape)}")
    validate_raw(raw, fmt, raw.shape[0], num_columns)
    if raw.device != x.device:
        raise ValueError(f"x is on {x.device} but the weight bytes are on {raw.device}")
    if raw.shape[1] > 0 and raw.stride(1) != 1:
        # Copying the weight on every call would hide a large cost: the caller fixes it once.
        raise ValueError("GGUF weight bytes must have contiguous rows (stride 1 in a row)")
    if x.stride(1) != 1:
        x = x.contiguous()
    num_tokens, num_rows = x.shape[0], raw.shape[0]
    out = torch.empty(num_tokens, num_rows, dtype=x.dtype, device=x.device)
    if num_tokens == 0 or num_rows == 0:
        return out
    if num_columns == 0:
        return out.zero_()
    block_t, block_n, block_k, num_warps = _tiles(num_tokens, fmt.weights_per_block)
    grid = (triton.cdiv(num_tokens, block_t), triton.cdiv(num_rows, block_n))
    _gguf_matmul_kernel[grid](
        x,
        x.stride(0),
        raw,
        raw.stride(0),
        out,
        out.stride(0),
        num_tokens,
        num_rows,
        num_columns,
        FORMAT=fmt.type_id,
        WEIGHTS_PER_BLOCK=fmt.weights_per_block,
        BYTES_PER_BLOCK=fmt.bytes_per_block,
        IEEE_DOT=x.dtype == torch.float32,
        BLOCK_T=block_t,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=num_warps,
    )
    return out
