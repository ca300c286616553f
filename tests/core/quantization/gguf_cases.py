"""Random GGUF weight bytes and the ``gguf`` package as the oracle (not collected itself).

Shared by the core tests of :mod:`kvplane.quantization.gguf_blocks` and the CUDA
platform's GGUF matmul kernel tests.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from kvplane.quantization.gguf_blocks import GGUF_BLOCK_FORMATS, GGUFBlockFormat, gguf_block_format

FORMAT_NAMES = list(GGUF_BLOCK_FORMATS)

# Byte offsets of the float16 fields in one block, from the published GGML layouts
# (written out here rather than taken from the library, so that the tests stay independent).
FLOAT16_FIELDS = {
    "Q4_0": (0,),
    "Q4_1": (0, 2),
    "Q8_0": (0,),
    "Q4_K": (0, 2),
    "Q5_K": (0, 2),
    "Q6_K": (208,),
}


def random_gguf_bytes(
    fmt: GGUFBlockFormat,
    num_rows: int,
    num_columns: int,
    generator: torch.Generator,
    scale: float | None = None,
) -> torch.Tensor:  # [num_rows, bytes_per_row] uint8
    """Random bytes of a ``[num_rows, num_columns]`` weight whose float16 fields are finite.

    With ``scale=None`` a field is any finite half (subnormals, signed zeros and 65504
    included): the widest test of the bit-exact decoding. Otherwise it is uniform in
    ``[-scale, scale]``, a weight of sane magnitude for matmul tolerances.
    """
    raw = torch.randint(
        0, 256, (num_rows, fmt.bytes_per_row(num_columns)), dtype=torch.uint8, generator=generator
    )
    blocks = raw.view(-1, fmt.bytes_per_block)  # [num_blocks, bytes_per_block]
    for offset in FLOAT16_FIELDS[fmt.name]:
        if scale is None:
            bits = torch.randint(0, 1 << 16, (blocks.shape[0],), generator=generator)
            is_special = (bits & 0x7C00) == 0x7C00  # exponent all ones: inf or NaN
            bits = torch.where(is_special, bits & ~0x4000, bits)  # clear one exponent bit
            halves = (bits - (bits >= 1 << 15).long() * (1 << 16)).to(torch.int16)
        else:
            uniform = torch.rand(blocks.shape[0], generator=generator) * 2.0 - 1.0
            halves = (uniform * scale).to(torch.float16).view(torch.int16)
        blocks[:, offset : offset + 2] = halves.view(torch.uint8).view(-1, 2)
    return raw


def oracle_dequantize(raw: torch.Tensor | np.ndarray, fmt: GGUFBlockFormat) -> torch.Tensor:
    """``gguf.quants.dequantize`` of the bytes: float32 ``[num_rows, num_columns]``."""
    import gguf

    data = raw.numpy() if isinstance(raw, torch.Tensor) else np.asarray(raw)
    weights = gguf.quants.dequantize(data, gguf.GGMLQuantizationType(fmt.type_id))
    assert not np.isnan(weights).any(), "the oracle decoded a NaN: a float16 field is not finite"
    return torch.from_numpy(np.ascontiguousarray(weights))


@functools.cache
def _reader(path: str) -> Any:
    """One parse per process: reading the file's metadata (its vocabulary) takes seconds."""
    import gguf

    return gguf.GGUFReader(path)


def default_model_tensors(
    max_rows: int, per_type: int = 2
) -> Iterator[tuple[str, GGUFBlockFormat, int, torch.Tensor]]:
    """``(name, format, num_columns, bytes [rows, bytes_per_row])`` of up to ``per_type``
    tensors of each supported type in the embedded SmolLM2 GGUF file, at most ``max_rows``
    rows each. Skips the test when the embedded model is not installed."""
    from kvplane.models.source import default_model_path

    try:
        path = default_model_path()
    except ValueError as error:
        pytest.skip(str(error))
    seen: dict[str, int] = {}
    for tensor in _reader(str(path)).tensors:
        type_name = tensor.tensor_type.name
        if type_name in GGUF_BLOCK_FORMATS and seen.get(type_name, 0) < per_type:
            seen[type_name] = seen.get(type_name, 0) + 1
            num_columns = int(tensor.shape[0])  # GGUF lists dimensions innermost first
            raw = torch.from_numpy(np.array(tensor.data[:max_rows], dtype=np.uint8))
            yield tensor.name, gguf_block_format(type_name), num_columns, raw
