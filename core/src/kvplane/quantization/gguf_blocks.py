"""GGUF block formats: the weight bytes as a GGUF file stores them, dequantized in torch.

A quantized GGUF weight of logical shape ``[num_rows, num_columns]`` is stored row after
row; each row is ``num_columns / weights_per_block`` blocks of ``bytes_per_block`` bytes,
so the tensor's bytes are a ``uint8`` tensor ``[num_rows, bytes_per_row]``. This module
describes the six supported formats and turns such bytes back into floats. It is pure
torch (any device) and the reference every platform kernel is tested against.

Layouts (all little-endian; ``f16`` is an IEEE half, read exactly and promoted to float32):

* ``Q4_0`` (32 weights, 18 bytes): ``d: f16``, 16 bytes of 4-bit codes; weight ``j`` is the
  low nibble of byte ``j % 16`` for ``j < 16`` and the high nibble for ``j >= 16``;
  ``w = d * (q - 8)``.
* ``Q4_1`` (32, 20): ``d: f16, m: f16``, nibbles as in Q4_0; ``w = d * q + m``.
* ``Q8_0`` (32, 34): ``d: f16``, 32 ``int8`` codes; ``w = q * d``.
* ``Q4_K`` (256, 144): ``d: f16, dmin: f16``, 12 bytes of eight 6-bit scales and eight
  6-bit mins (see :func:`_k_scales_and_mins`), 128 bytes of nibbles: 32-byte group ``c``
  holds sub-block ``2c`` in its low nibbles and ``2c + 1`` in its high nibbles;
  ``w = (d * scale) * q - dmin * min`` per 32-weight sub-block.
* ``Q5_K`` (256, 176): as Q4_K, plus 32 bytes ``qh`` between the scales and the nibbles:
  bit ``s`` of ``qh[l]`` is the fifth bit of weight ``l`` of sub-block ``s``.
* ``Q6_K`` (256, 210): 128 bytes of low nibbles, 64 bytes of 2-bit high parts, 16 ``int8``
  scales (one per 16 weights), then ``d: f16`` *last*; ``w = (d * scale) * (q - 32)``.

The float32 operations happen in the same order, one rounding each, as in the ``gguf``
Python package's ``gguf.quants.dequantize``; the results are bit-identical to it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "GGUF_BLOCK_FORMATS",
    "GGUFBlockFormat",
    "dequantize_rows",
    "gguf_block_format",
    "gguf_linear_reference",
    "raw_shape",
    "validate_raw",
]


@dataclass(frozen=True, slots=True)
class GGUFBlockFormat:
    """One GGML block type: ``weights_per_block`` weights stored in ``bytes_per_block``."""

    name: str
    #: The ``GGMLQuantizationType`` id a GGUF file records for the tensor.
    type_id: int
    weights_per_block: int
    bytes_per_block: int

    def bytes_per_row(self, num_columns: int) -> int:
        """Bytes of one row of ``num_columns`` weights; ValueError unless whole blocks."""
        if num_columns < 0 or num_columns % self.weights_per_block != 0:
            raise ValueError(
                f"{self.name} stores rows in blocks of {self.weights_per_block} weights; "
                f"{num_columns} columns is not a multiple of {self.weights_per_block}"
            )
        return num_columns // self.weights_per_block * self.bytes_per_block


GGUF_BLOCK_FORMATS: dict[str, GGUFBlockFormat] = {
    fmt.name: fmt
    for fmt in (
        GGUFBlockFormat("Q4_0", 2, 32, 18),
        GGUFBlockFormat("Q4_1", 3, 32, 20),
        GGUFBlockFormat("Q8_0", 8, 32, 34),
        GGUFBlockFormat("Q4_K", 12, 256, 144),
        GGUFBlockFormat("Q5_K", 13, 256, 176),
        GGUFBlockFormat("Q6_K", 14, 256, 210),
    )
}
_BY_TYPE_ID = {fmt.type_id: fmt for fmt in GGUF_BLOCK_FORMATS.values()}

#: Largest number of weights :func:`gguf_linear_reference` dequantizes at once.
DEQUANT_CHUNK_ELEMENTS = 1 << 22


def gguf_block_format(type_id_or_name: GGUFBlockFormat | int | str) -> GGUFBlockFormat:
    """The format for a GGML type id (``2``, or ``gguf.GGMLQuantizationType.Q4_0``, an
    ``int``) or name (``"Q4_0"``, any case); a format passes through unchanged.

    Raises ValueError naming the type and the supported ones for anything else.
    """
    if isinstance(type_id_or_name, GGUFBlockFormat):
        return type_id_or_name
    fmt: GGUFBlockFormat | None = None
    if isinstance(type_id_or_name, str):
        fmt = GGUF_BLOCK_FORMATS.get(type_id_or_name.upper())
    elif isinstance(type_id_or_name, int) and not isinstance(type_id_or_name, bool):
        fmt = _BY_TYPE_ID.get(int(type_id_or_name))
    if fmt is None:
        supported = ", ".join(f"{f.name} ({f.type_id})" for f in GGUF_BLOCK_FORMATS.values())
        raise ValueError(f"unsupported GGUF block type {type_id_or_name!r}; supported: {supported}")
    return fmt


def raw_shape(fmt: GGUFBlockFormat | int | str, num_rows: int, num_columns: int) -> tuple[int, int]:
    """Shape of the ``uint8`` tensor holding a ``[num_rows, num_columns]`` weight."""
    return num_rows, gguf_block_format(fmt).bytes_per_row(num_columns)


def validate_raw(
    raw: torch.Tensor, fmt: GGUFBlockFormat | int | str, num_rows: int, num_columns: int
) -> None:
    """Raise ValueError unless ``raw`` is the ``uint8`` bytes of a ``[num_rows,
    num_columns]`` weight in ``fmt`` (or if ``num_columns`` is not whole blocks)."""
    fmt = gguf_block_format(fmt)
    expected = raw_shape(fmt, num_rows, num_columns)
    if raw.dtype != torch.uint8:
        raise ValueError(f"GGUF {fmt.name} weight bytes must be torch.uint8, got {raw.dtype}")
    if tuple(raw.shape) != expected:
        raise ValueError(
            f"GGUF {fmt.name} bytes of shape {tuple(raw.shape)} do not hold a "
            f"[{num_rows}, {num_columns}] weight: expected {expected} "
            f"({fmt.bytes_per_block} bytes per {fmt.weights_per_block} weights)"
        )


# -- per-format dequantization: [num_blocks, bytes_per_block] -> [num_blocks, weights] ----


def _f16(blocks: torch.Tensor, offset: int) -> torch.Tensor:  # -> [num_blocks, 1] float32
    """The little-endian half at ``offset`` of every block, promoted exactly to float32.

    The bits are assembled arithmetically, so the host's byte order does not matter.
    """
    bits = blocks[:, offset : offset + 1].to(torch.int32)
    bits = bits | (blocks[:, offset + 1 : offset + 2].to(torch.int32) << 8)
    bits = torch.where(bits >= 1 << 15, bits - (1 << 16), bits)  # as a signed int16
    return bits.to(torch.int16).view(torch.float16).to(torch.float32)


def _nibbles(codes: torch.Tensor) -> torch.Tensor:  # [..., n] uint8 -> [..., 2, n]
    """Low nibbles, then high nibbles: the order in which every 4-bit GGUF format counts."""
    return torch.stack((codes & 0x0F, codes >> 4), dim=-2)


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks, 0)  # [num_blocks, 1]
    q = _nibbles(blocks[:, 2:18]).reshape(-1, 32).to(torch.float32) - 8.0
    return d * q


def _q4_1(blocks: torch.Tensor) -> torch.Tensor:
    d, m = _f16(blocks, 0), _f16(blocks, 2)  # [num_blocks, 1]
    q = _nibbles(blocks[:, 4:20]).reshape(-1, 32).to(torch.float32)
    return d * q + m  # two roundings (no fused multiply-add), as the oracle


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks, 0)  # [num_blocks, 1]
    return blocks[:, 2:34].view(torch.int8).to(torch.float32) * d


def _k_scales_and_mins(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The eight 6-bit scales and mins of Q4_K/Q5_K, ``[num_blocks, 12]`` -> 2 x ``[.., 8]``.

    Bytes 0-3 hold scales 0-3 in their low 6 bits, bytes 4-7 mins 0-3 likewise. Sub-blocks
    4-7 take their low 4 bits from bytes 8-11 (scale in the low nibble, min in the high
    one) and their top 2 bits from the spare top bits of bytes 0-3 (scales) and 4-7 (mins).
    """
    low_scales, low_mins, extra = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = torch.cat((low_scales & 0x3F, (extra & 0x0F) | ((low_scales >> 6) << 4)), dim=1)
    mins = torch.cat((low_mins & 0x3F, (extra >> 4) | ((low_mins >> 6) << 4)), dim=1)
    return scales, mins


def _k_affine(blocks: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``(d * scale) * q - dmin * min`` with ``q`` as ``[num_blocks, 8, 32]`` codes."""
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)  # [num_blocks, 1]
    scales, mins = _k_scales_and_mins(blocks[:, 4:16])  # [num_blocks, 8] each
    sub_scale = (d * scales.to(torch.float32)).unsqueeze(-1)  # [num_blocks, 8, 1]
    sub_min = (dmin * mins.to(torch.float32)).unsqueeze(-1)
    return (sub_scale * q.to(torch.float32) - sub_min).reshape(-1, 256)


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    # 32-byte group c holds sub-block 2c (low nibbles) and 2c + 1 (high nibbles).
    q = _nibbles(blocks[:, 16:144].reshape(-1, 4, 32)).reshape(-1, 8, 32)
    return _k_affine(blocks, q)


_BIT_SHIFTS = tuple(range(8))


def _q5_k(blocks: torch.Tensor) -> torch.Tensor:
    low = _nibbles(blocks[:, 48:176].reshape(-1, 4, 32)).reshape(-1, 8, 32)
    high_bits = blocks[:, 16:48]  # [num_blocks, 32]: bit s belongs to sub-block s
    high = torch.stack([(high_bits >> s) & 1 for s in _BIT_SHIFTS], dim=1)  # [nb, 8, 32]
    return _k_affine(blocks, low | (high << 4))


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    # Each half of 128 weights: 64 low-nibble bytes (weights 0-63 low, 64-127 high) and
    # 32 bytes of 2-bit high parts (bits 2s..2s+1 for weights 32s..32s+31).
    low = _nibbles(blocks[:, 0:128].reshape(-1, 2, 64)).reshape(-1, 2, 128)
    high_bits = blocks[:, 128:192].reshape(-1, 2, 32)
    high = torch.stack([(high_bits >> s) & 3 for s in (0, 2, 4, 6)], dim=2).reshape(-1, 2, 128)
    q = ((low | (high << 4)).to(torch.float32) - 32.0).reshape(-1, 16, 16)
    scales = blocks[:, 192:208].view(torch.int8).to(torch.float32)  # [num_blocks, 16]
    sub_scale = (_f16(blocks, 208) * scales).unsqueeze(-1)  # [num_blocks, 16, 1]
    return (sub_scale * q).reshape(-1, 256)


_DEQUANTIZERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "Q4_0": _q4_0,
    "Q4_1": _q4_1,
    "Q8_0": _q8_0,
    "Q4_K": _q4_k,
    "Q5_K": _q5_k,
    "Q6_K": _q6_k,
}


def dequantize_rows(
    raw: torch.Tensor,  # [num_rows, bytes_per_row] uint8
    fmt: GGUFBlockFormat | int | str,
    num_columns: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:  # [num_rows, num_columns]
    """The weights of ``raw`` (the file's bytes of a ``[num_rows, num_columns]`` tensor).

    Computed in float32, bit-identical to ``gguf.quants.dequantize``, then converted to
    ``dtype``. ``raw`` is not modified; the result is on ``raw``'s device. Raises
    ValueError for an unsupported format or bytes that do not match the shape.
    """
    fmt = gguf_block_format(fmt)
    if raw.dim() != 2:
        raise ValueError(f"GGUF weight bytes must be 2-D [rows, bytes], got {tuple(raw.shape)}")
    validate_raw(raw, fmt, raw.shape[0], num_columns)
    if not dtype.is_floating_point:
        raise ValueError(f"dequantize_rows needs a floating-point dtype, got {dtype}")
    blocks = raw.reshape(-1, fmt.bytes_per_block)  # [num_blocks, bytes_per_block]
    weights = _DEQUANTIZERS[fmt.name](blocks)  # [num_blocks, weights_per_block] float32
    return weights.reshape(raw.shape[0], num_columns).to(dtype)


def gguf_linear_reference(
    x: torch.Tensor,  # [num_tokens, in_features]
    raw: torch.Tensor,  # [out_features, bytes_per_row] uint8
    fmt: GGUFBlockFormat | int | str,
    out_features: int,
    in_features: int,
    bias: torch.Tensor | None = None,  # [out_features]
) -> torch.Tensor:  # [num_tokens, out_features] in x.dtype
    """``x @ W.T + bias`` for a GGUF-quantized ``W``, the torch path of every platform.

    The weights are dequantized and rounded to ``x.dtype`` (as a kernel feeding them to a
    ``x.dtype`` matrix unit does); products are summed in float32, the bias added in
    float32, and the result rounded once to ``x.dtype``. At most
    :data:`DEQUANT_CHUNK_ELEMENTS` weights are dequantized at a time, so the float copy
    of a large weight never exists whole.
    """
    fmt = gguf_block_format(fmt)
    if x.dim() != 2 or x.shape[1] != in_features:
        raise ValueError(
            f"x must be [num_tokens, {in_features}] for this weight, got {tuple(x.shape)}"
        )
    validate_raw(raw, fmt, out_features, in_features)
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias must be [{out_features}], got {tuple(bias.shape)}")
    x_f32 = x.to(torch.float32)  # [num_tokens, in_features]
    out = torch.empty(x.shape[0], out_features, dtype=x.dtype, device=x.device)
    rows_per_chunk = max(1, DEQUANT_CHUNK_ELEMENTS // max(1, in_features))
    for start in range(0, out_features, rows_per_chunk):
        stop = min(start + rows_per_chunk, out_features)
        weight = dequantize_rows(raw[start:stop], fmt, in_features, dtype=x.dtype)
        acc = x_f32 @ weight.to(torch.float32).T  # [num_tokens, stop - start]
        if bias is not None:
            acc = acc + bias[start:stop].to(torch.float32)
        out[:, start:stop] = acc.to(x.dtype)
    return out
