"""GGUF block formats in torch against the ``gguf`` package's own dequantization.

Random blocks (every float16 field finite) and tensors of the embedded SmolLM2 file must
decode bit for bit as ``gguf.quants.dequantize`` decodes them; the linear reference must
be ``x @ W.T`` of those weights.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from kvplane.quantization import gguf_blocks
from kvplane.quantization.gguf_blocks import (
    GGUF_BLOCK_FORMATS,
    dequantize_rows,
    gguf_block_format,
    gguf_linear_reference,
    raw_shape,
    validate_raw,
)
from tests.core.quantization.gguf_cases import (
    FORMAT_NAMES,
    default_model_tensors,
    oracle_dequantize,
    random_gguf_bytes,
)

gguf = pytest.importorskip("gguf")


@pytest.fixture
def generator(request: pytest.FixtureRequest) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal as float32 bit patterns: signed zeros must match too."""
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


# -- the formats -----------------------------------------------------------------------


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_formats_agree_with_the_gguf_constants(name: str) -> None:
    fmt = GGUF_BLOCK_FORMATS[name]
    qtype = gguf.GGMLQuantizationType(fmt.type_id)
    assert qtype.name == name
    assert gguf.GGML_QUANT_SIZES[qtype] == (fmt.weights_per_block, fmt.bytes_per_block)


def test_lookup_by_id_name_and_enum() -> None:
    q4_k = GGUF_BLOCK_FORMATS["Q4_K"]
    assert gguf_block_format(12) is q4_k
    assert gguf_block_format("q4_k") is q4_k
    assert gguf_block_format(gguf.GGMLQuantizationType.Q4_K) is q4_k
    assert gguf_block_format(q4_k) is q4_k
    assert raw_shape("Q8_0", 3, 64) == (3, 68)


@pytest.mark.parametrize("unsupported", [6, "Q5_0", "F16", 99, "nope", True])
def test_unsupported_type_names_the_supported_ones(unsupported: object) -> None:
    with pytest.raises(ValueError, match=r"unsupported GGUF block type .*Q4_0 \(2\).*Q6_K"):
        gguf_block_format(unsupported)  # type: ignore[arg-type]


# -- dequantization --------------------------------------------------------------------


@pytest.mark.parametrize("scale", [None, 0.05], ids=["any-finite-half", "moderate"])
@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_dequantize_rows_is_bit_exact(
    name: str, scale: float | None, generator: torch.Generator
) -> None:
    fmt = GGUF_BLOCK_FORMATS[name]
    num_columns = 3 * fmt.weights_per_block
    raw = random_gguf_bytes(fmt, 5, num_columns, generator, scale)
    before = raw.clone()
    weights = dequantize_rows(raw, fmt, num_columns)
    assert weights.dtype == torch.float32
    assert same_bits(weights, oracle_dequantize(raw, fmt))
    assert torch.equal(raw, before), "dequantize_rows must not modify the bytes"


@pytest.mark.parametrize("name", ["Q4_1", "Q6_K"])
def test_dequantize_rows_of_strided_bytes_in_another_dtype(
    name: str, generator: torch.Generator
) -> None:
    fmt = GGUF_BLOCK_FORMATS[name]
    num_columns = 2 * fmt.weights_per_block
    wide = random_gguf_bytes(fmt, 4, 2 * num_columns, generator)
    raw = wide[:, : fmt.bytes_per_row(num_columns)]  # rows not contiguous in memory
    expected = oracle_dequantize(raw.contiguous(), fmt)
    assert same_bits(dequantize_rows(raw, fmt, num_columns), expected)
    assert torch.equal(dequantize_rows(raw, fmt, num_columns, torch.bfloat16), expected.bfloat16())


def test_dequantize_zero_rows() -> None:
    raw = torch.empty(0, 18, dtype=torch.uint8)
    assert dequantize_rows(raw, "Q4_0", 32).shape == (0, 32)


# -- the linear reference --------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_linear_reference_is_x_times_dequantized_weight(
    name: str, dtype: torch.dtype, generator: torch.Generator
) -> None:
    fmt = GGUF_BLOCK_FORMATS[name]
    num_tokens, out_features, in_features = 3, 7, 2 * fmt.weights_per_block
    raw = random_gguf_bytes(fmt, out_features, in_features, generator, scale=0.05)
    x = torch.randn(num_tokens, in_features, generator=generator).to(dtype)
    bias = torch.randn(out_features, generator=generator).to(dtype)
    weight = oracle_dequantize(raw, fmt).to(dtype).float()  # rounded like x, as documented
    expected = (x.float() @ weight.T + bias.float()).to(dtype)
    out = gguf_linear_reference(x, raw, fmt, out_features, in_features, bias)
    assert out.dtype == dtype and out.shape == (num_tokens, out_features)
    torch.testing.assert_close(out, expected)
    no_bias = gguf_linear_reference(x, raw, fmt, out_features, in_features)
    torch.testing.assert_close(no_bias, (x.float() @ weight.T).to(dtype))


def test_linear_reference_in_chunks_of_rows(
    generator: torch.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    fmt = GGUF_BLOCK_FORMATS["Q4_K"]
    raw = random_gguf_bytes(fmt, 7, 512, generator, scale=0.05)
    x = torch.randn(4, 512, generator=generator)
    whole = gguf_linear_reference(x, raw, fmt, 7, 512)
    monkeypatch.setattr(gguf_blocks, "DEQUANT_CHUNK_ELEMENTS", 2 * 512)  # 4 chunks of rows
    torch.testing.assert_close(gguf_linear_reference(x, raw, fmt, 7, 512), whole)


# -- user errors -----------------------------------------------------------------------


def test_bad_shapes_raise_value_errors(generator: torch.Generator) -> None:
    fmt = GGUF_BLOCK_FORMATS["Q4_0"]
    raw = random_gguf_bytes(fmt, 4, 64, generator)  # [4, 36]
    with pytest.raises(ValueError, match=r"not a multiple of 32"):
        dequantize_rows(raw, fmt, 48)
    with pytest.raises(ValueError, match=r"\(4, 36\) do not hold a \[4, 96\] weight"):
        dequantize_rows(raw, fmt, 96)
    with pytest.raises(ValueError, match=r"2-D"):
        dequantize_rows(raw.view(-1), fmt, 64)
    with pytest.raises(ValueError, match=r"uint8"):
        validate_raw(raw.to(torch.int16), fmt, 4, 64)
    with pytest.raises(ValueError, match=r"floating-point"):
        dequantize_rows(raw, fmt, 64, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"do not hold a \[5, 64\] weight"):
        gguf_linear_reference(torch.randn(2, 64), raw, fmt, 5, 64)
    with pytest.raises(ValueError, match=r"x must be \[num_tokens, 64\]"):
        gguf_linear_reference(torch.randn(2, 32), raw, fmt, 4, 64)
    with pytest.raises(ValueError, match=r"bias must be \[4\]"):
        gguf_linear_reference(torch.randn(2, 64), raw, fmt, 4, 64, torch.zeros(3))


# -- a real file -----------------------------------------------------------------------


def test_tensors_of_the_default_model_decode_as_gguf_decodes_them() -> None:
    checked = []
    for name, fmt, num_columns, raw in default_model_tensors(max_rows=512):
        assert same_bits(dequantize_rows(raw, fmt, num_columns), oracle_dequantize(raw, fmt))
        checked.append(f"{name}:{fmt.name}")
    assert len(checked) >= 2, f"expected quantized tensors in the default model, got {checked}"
