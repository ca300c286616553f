"""The ``gguf`` method on its own: stacked matrices in different block types (and float)
multiply as their dequantized weights, and bad input is refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvplane.plugins.types import LayerQuantSpec
from kvplane.quantization.config import OPT_CHECKPOINT, resolve_quant_config
from kvplane.quantization.gguf import RAW_PREFIX, GgufMethod
from kvplane.quantization.gguf_blocks import dequantize_rows, gguf_block_format
from tests.core.quantization.gguf_cases import random_gguf_bytes

GGUF_OPTIONS = ((OPT_CHECKPOINT, "gguf"),)
INPUT_SIZE = 256


def _layer(spec: LayerQuantSpec, shards: list[tuple[str, torch.Tensor]]) -> torch.nn.Module:
    method = GgufMethod()
    layer = torch.nn.Module()
    method.create_weights(layer, spec)
    for index, (name, tensor) in enumerate(shards):
        assert method.load_checkpoint_tensor(layer, name, tensor, index) == "weight"
    method.process_weights_after_loading(layer)
    return layer


@pytest.mark.parametrize("formats", [("Q4_1", "Q4_1", "Q4_1"), ("Q4_K", "Q6_K", None)])
def test_stacked_shards_multiply_as_their_dequantized_weights(
    formats: tuple[str | None, ...], kvplane_generator: torch.Generator
) -> None:
    sizes = (64, 32, 32)
    spec = LayerQuantSpec(
        "gguf", INPUT_SIZE, sum(sizes), torch.float32, options=GGUF_OPTIONS, output_sizes=sizes
    )
    shards, dequantized = [], []
    for name, rows in zip(formats, sizes, strict=True):
        if name is None:
            weight = torch.randn(rows, INPUT_SIZE, generator=kvplane_generator) * 0.05
            shards.append(("weight", weight))
            dequantized.append(weight)
        else:
            fmt = gguf_block_format(name)
            raw = random_gguf_bytes(fmt, rows, INPUT_SIZE, kvplane_generator)
            shards.append((f"{RAW_PREFIX}{name}", raw))
            dequantized.append(dequantize_rows(raw, fmt, INPUT_SIZE))
    layer = _layer(spec, shards)
    assert len(layer.gguf_formats) == len(set(formats))  # one part per type
    x = torch.randn(5, INPUT_SIZE, generator=kvplane_generator)
    expected = F.linear(x, torch.cat(dequantized))
    torch.testing.assert_close(GgufMethod().apply(layer, x), expected, rtol=1e-5, atol=1e-5)


def test_bad_input_is_refused(kvplane_generator: torch.Generator) -> None:
    spec = LayerQuantSpec("gguf", INPUT_SIZE, 32, torch.float32, options=GGUF_OPTIONS)
    method, layer = GgufMethod(), torch.nn.Module()
    method.create_weights(layer, spec)
    raw = random_gguf_bytes(gguf_block_format("Q8_0"), 16, INPUT_SIZE, kvplane_generator)
    with pytest.raises(ValueError):
        method.load_checkpoint_tensor(layer, "gguf_Q8_0", raw, 0)  # 16 rows, not 32
    with pytest.raises(ValueError, match="Q2_K"):
        method.load_checkpoint_tensor(layer, "gguf_Q2_K", raw, 0)
    float_spec = LayerQuantSpec("gguf", INPUT_SIZE, 32, torch.float32)
    ok, reason = method.can_implement(float_spec)
    assert not ok and "GGUF" in reason
    with pytest.raises(ValueError, match=r"load a \.gguf"):
        resolve_quant_config("gguf", object(), is_gguf=False)
