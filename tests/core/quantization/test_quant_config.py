"""Reading a checkpoint's quantization_config and reconciling it with the user's request."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from kvplane.quantization.config import (
    OPT_ACTIVATIONS,
    OPT_CHECKPOINT,
    OPT_WEIGHT_STRATEGY,
    QuantConfig,
    is_ignored,
    resolve_quant_config,
)
from kvplane.quantization.writer import compressed_tensors_config


def hf_config(quantization_config: dict[str, Any] | None = None) -> Any:
    if quantization_config is None:
        return SimpleNamespace()
    return SimpleNamespace(quantization_config=quantization_config)


def test_float_checkpoint_follows_the_request() -> None:
    assert resolve_quant_config(None, hf_config()) == QuantConfig()
    assert resolve_quant_config("none", hf_config()) == QuantConfig()
    fp8 = resolve_quant_config("fp8", hf_config())
    assert fp8.method == "fp8" and fp8.option(OPT_CHECKPOINT) is None
    assert fp8.option(OPT_ACTIVATIONS) == "dynamic"
    assert resolve_quant_config("int8", hf_config()).method == "int8"


@pytest.mark.parametrize(("method", "kind"), [("fp8", "float"), ("int8", "int")])
def test_compressed_tensors_w8a8_as_written_by_kvplane_quantize(method: str, kind: str) -> None:
    declared = compressed_tensors_config(method)
    config = resolve_quant_config(None, hf_config(declared))
    assert config.method == method
    assert config.option(OPT_CHECKPOINT) == "compressed-tensors"
    assert config.option(OPT_WEIGHT_STRATEGY) == "channel"
    assert config.option(OPT_ACTIVATIONS) == "dynamic"
    assert "lm_head" in config.ignored_layers
    assert resolve_quant_config(method, hf_config(declared)) == config


def test_fp8_layout_with_static_activations() -> None:
    declared = {"quant_method": "fp8", "activation_scheme": "static", "ignored_layers": ["x"]}
    config = resolve_quant_config(None, hf_config(declared))
    assert config.method == "fp8" and config.option(OPT_CHECKPOINT) == "fp8"
    assert config.option(OPT_WEIGHT_STRATEGY) == "tensor"
    assert config.option(OPT_ACTIVATIONS) == "static" and config.ignored_layers == ("x",)


def _group(**changes: Any) -> dict[str, Any]:
    declared = compressed_tensors_config("fp8")
    group = declared["config_groups"]["group_0"]
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            group[section][field] = value
        else:
            group[section] = value
    return declared


@pytest.mark.parametrize(
    ("declared", "field"),
    [
        ({"quant_method": "bitsandbytes"}, "quant_method 'bitsandbytes'"),
        ({"quant_method": "fp8", "weight_block_size": [128, 128]}, "weight_block_size"),
        ({"quant_method": "fp8", "activation_scheme": "sometimes"}, "activation_scheme"),
        (_group(weights__strategy="group"), "group_0.weights.strategy"),
        (_group(weights__num_bits=4), "group_0.weights: num_bits 4"),
        (_group(targets=["Attention"]), "group_0.targets"),
        (_group(input_activations__strategy="group"), "group_0.input_activations"),
        (_group(weights__symmetric=False), "symmetric"),
    ],
)
def test_unreadable_configs_name_the_field(declared: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match="quantization_config") as error:
        resolve_quant_config(None, hf_config(declared))
    assert field in str(error.value)


def test_a_request_cannot_change_the_checkpoint_format() -> None:
    declared = compressed_tensors_config("int8")
    with pytest.raises(ValueError, match=r"quantized with 'int8'.*quantization='fp8'"):
        resolve_quant_config("fp8", hf_config(declared))


def test_ignore_patterns() -> None:
    patterns = ("lm_head", "re:.*mlp.gate$", "model.layers.0.self_attn.o_proj")
    assert is_ignored("lm_head", patterns)
    assert is_ignored("model.layers.3.mlp.gate", patterns)
    assert not is_ignored("model.layers.3.mlp.gate_up_proj", patterns)
    assert is_ignored("model.layers.0.self_attn.o_proj", patterns)
    assert not is_ignored("model.layers.10.self_attn.o_proj", patterns)
