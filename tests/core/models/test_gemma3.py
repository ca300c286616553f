"""Gemma 3 text (q/k norms, per-layer-type rope, sliding windows) against transformers."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from transformers import Gemma3TextConfig

from kvplane.models.gemma2 import FULL, SLIDING
from kvplane.models.gemma3 import gemma3_rope_parameters
from kvplane.models.layers.attention import Attention
from kvplane.models.registry import architecture_of

from .harness import check_architecture, randomize_norm_weights

#: Rope settings given the transformers 5 way (one dict per layer type) and the old way
#: (``rope_theta`` + ``rope_scaling`` for full layers, ``rope_local_base_freq``).
ROPE_STYLES: dict[str, dict[str, Any]] = {
    "per_layer_type": {
        "rope_parameters": {
            FULL: {"rope_type": "linear", "factor": 4.0, "rope_theta": 1_000_000.0},
            SLIDING: {"rope_type": "default", "rope_theta": 1_000.0},
        }
    },
    "legacy": {
        "rope_theta": 50_000.0,
        "rope_local_base_freq": 500.0,
        "rope_scaling": {
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 128,
        },
    },
}


def tiny_gemma3_config(**overrides: Any) -> Gemma3TextConfig:
    """4 layers, every third full (sliding, sliding, full, sliding), window 8.

    ``attn_logit_softcapping`` is set although transformers' Gemma 3 ignores it, so the
    test pins that kvplane ignores it too; ``initializer_range`` 0.1 makes the final
    soft-cap far from linear.
    """
    options: dict[str, Any] = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=24,
        sliding_window=8,
        sliding_window_pattern=3,
        attn_logit_softcapping=1.5,
        final_logit_softcapping=2.0,
        initializer_range=0.1,
        max_position_embeddings=512,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    options.update(overrides)
    config = Gemma3TextConfig(**options)
    config._attn_implementation = "eager"
    return config


@pytest.mark.parametrize("rope", sorted(ROPE_STYLES))
def test_gemma3_matches_transformers(rope: str, tmp_path: Path) -> None:
    config = tiny_gemma3_config(**ROPE_STYLES[rope])
    assert config.layer_types == [SLIDING, SLIDING, FULL, SLIDING]
    llm = check_architecture(config, tmp_path, prepare_reference=randomize_norm_weights)
    specs = [m.spec for m in llm.engine.runner.model.modules() if isinstance(m, Attention)]
    assert [spec.sliding_window for spec in specs] == [8, 8, None, 8]
    assert all(spec.logit_softcap is None for spec in specs)


def test_gemma3_untied_without_final_cap(tmp_path: Path) -> None:
    config = tiny_gemma3_config(
        tie_word_embeddings=False,
        final_logit_softcapping=None,
        attn_logit_softcapping=None,
        sliding_window_pattern=2,
    )
    check_architecture(config, tmp_path, prepare_reference=randomize_norm_weights)


def test_legacy_rope_settings_per_layer_type() -> None:
    config = SimpleNamespace(
        rope_theta=1_000_000.0,
        rope_local_base_freq=10_000.0,
        rope_scaling={"rope_type": "linear", "factor": 8.0},
    )
    assert gemma3_rope_parameters(config, SLIDING) == {
        "rope_type": "default",
        "rope_theta": 10_000.0,
    }
    full = gemma3_rope_parameters(config, FULL)
    assert (full["rope_type"], full["factor"], full["rope_theta"]) == ("linear", 8.0, 1e6)


def test_model_type_fallbacks() -> None:
    assert architecture_of(SimpleNamespace(model_type="gemma3_text")) == "Gemma3ForCausalLM"
    assert architecture_of(SimpleNamespace(model_type="gemma2")) == "Gemma2ForCausalLM"
