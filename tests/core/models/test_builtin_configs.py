"""Built-in configs: every name resolves to a registered architecture, no files needed."""

from __future__ import annotations

import pytest

from kvplane.models.builtin_configs import builtin_config, builtin_config_names
from kvplane.models.config import load_hf_config
from kvplane.models.registry import architecture_of, supported_architectures
from kvplane.models.source import resolve_model


def test_the_promised_names_exist() -> None:
    assert {"qwen3-0.6b", "llama-3-8b", "llama-3.2-1b", "qwen3-30b-a3b"} <= set(
        builtin_config_names()
    )


@pytest.mark.parametrize("name", builtin_config_names())
def test_each_builtin_config_is_a_supported_architecture(name: str) -> None:
    source = resolve_model(name, load_format="dummy")
    assert not source.has_files
    config = load_hf_config(source)
    assert architecture_of(config) in supported_architectures()
    assert config == builtin_config(name) or config.to_dict() == builtin_config(name).to_dict()


def test_shapes_are_the_published_ones() -> None:
    qwen = builtin_config("qwen3-0.6b")
    assert (qwen.hidden_size, qwen.num_hidden_layers, qwen.num_key_value_heads, qwen.head_dim) == (
        1024,
        28,
        8,
        128,
    )
    llama = builtin_config("llama-3-8b")
    assert (llama.hidden_size, llama.intermediate_size, llama.num_hidden_layers) == (
        4096,
        14336,
        32,
    )
    moe = builtin_config("qwen3-30b-a3b")
    assert (moe.num_experts, moe.num_experts_per_tok, moe.moe_intermediate_size) == (128, 8, 768)


def test_builtin_names_need_dummy_weights() -> None:
    with pytest.raises(ValueError, match="load_format='dummy'"):
        resolve_model("qwen3-0.6b")
    with pytest.raises(ValueError, match="no built-in config"):
        builtin_config("gpt-17")
