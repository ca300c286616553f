"""GPTQ and AWQ checkpoints end to end: an int4 model is an exact function of its stored
weights, so kvplane must match transformers run on the dequantized weights in float32
(logits within 1e-4 relative, greedy tokens identical)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from kvplane.cli.main import main as cli_main
from kvplane.models.weights import WeightLoadError
from kvplane.testing.models import save_random_model, tiny_llama_config
from tests.core.models.harness import load_tiny
from tests.core.quantization.int4_oracle import (
    assert_matches,
    dequantized_model,
    write_act_order_checkpoint,
)

GROUP_SIZE = 32


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("float")
    save_random_model(tiny_llama_config(), directory)
    return directory


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_quantize_writes_int4_that_matches_its_dequantized_weights(
    method: str, float_dir: Path, tmp_path: Path
) -> None:
    quantized = tmp_path / method
    args = ["quantize", str(float_dir), str(quantized), "--method", method, "--bits", "4"]
    assert cli_main([*args, "--group-size", str(GROUP_SIZE)]) == 0
    reference = dequantized_model(quantized, tmp_path / "oracle")
    assert_matches(quantized, reference)
    llm = load_tiny(quantized)
    layer = llm.engine.runner.model.model.layers[0].self_attn.qkv_proj
    assert layer.quant_method.name == method and layer.qweight.dtype == torch.int32


def test_gptq_act_order_matches_its_dequantized_weights(float_dir: Path, tmp_path: Path) -> None:
    quantized = tmp_path / "act-order"
    write_act_order_checkpoint(float_dir, quantized, GROUP_SIZE)
    reference = dequantized_model(quantized, tmp_path / "oracle")
    assert_matches(quantized, reference)
    layer = load_tiny(quantized).engine.runner.model.model.layers[0].self_attn.qkv_proj
    assert layer.g_idx is not None  # the scattered groups are kept, not assumed


def test_stacked_matrices_with_different_act_orders_are_refused(
    float_dir: Path, tmp_path: Path
) -> None:
    quantized = tmp_path / "act-order"
    write_act_order_checkpoint(float_dir, quantized, GROUP_SIZE)
    tensors = load_file(str(quantized / "model.safetensors"))
    name = "model.layers.0.self_attn.k_proj.g_idx"
    tensors[name] = tensors[name].flip(0).contiguous()
    save_file(tensors, str(quantized / "model.safetensors"))
    with pytest.raises(
        WeightLoadError, match=r"layers\.0\.self_attn\.[qkv]_proj\.g_idx: .*differs"
    ):
        load_tiny(quantized)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"bits": 8}, "bits 8"),
        ({"group_size": 0}, "group_size"),
        ({"checkpoint_format": "marlin"}, "checkpoint_format"),
    ],
)
def test_unreadable_gptq_configs_name_the_field(
    changes: dict[str, Any], field: str, float_dir: Path, tmp_path: Path
) -> None:
    quantized = tmp_path / "gptq"
    assert cli_main(["quantize", str(float_dir), str(quantized), "--method", "gptq"]) == 0
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"].update(changes)
    (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=field):
        load_tiny(quantized)
