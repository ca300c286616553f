"""Gemma 2 (soft-caps, sliding windows, sandwich norms, 1 + weight) against transformers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from transformers import Gemma2Config

from kvplane.models.gemma2 import FULL, SLIDING, gemma_layer_types
from kvplane.models.layers.attention import Attention

from .harness import check_architecture, randomize_norm_weights


def tiny_gemma2_config(**overrides: Any) -> Gemma2Config:
    """4 layers alternating sliding (window 8, shorter than most prompts) and full.

    ``initializer_range`` 0.1 makes attention scores and logits large enough (a few
    units) that the small soft-caps below are far from linear.
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
        attn_logit_softcapping=1.5,
        final_logit_softcapping=2.0,
        initializer_range=0.1,
        max_position_embeddings=512,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    options.update(overrides)
    config = Gemma2Config(**options)
    config._attn_implementation = "eager"  # the only transformers path with soft-capping
    return config


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_gemma2_matches_transformers(tied: bool, tmp_path: Path) -> None:
    config = tiny_gemma2_config(tie_word_embeddings=tied)
    llm = check_architecture(config, tmp_path, prepare_reference=randomize_norm_weights)
    windows = [
        layer.spec.sliding_window
        for layer in llm.engine.runner.model.modules()
        if isinstance(layer, Attention)
    ]
    assert windows == [8, None, 8, None]


def test_gemma2_without_soft_caps(tmp_path: Path) -> None:
    config = tiny_gemma2_config(attn_logit_softcapping=None, final_logit_softcapping=None)
    check_architecture(config, tmp_path, prepare_reference=randomize_norm_weights)


def test_layer_types_default_alternates_and_rejects_unknown() -> None:
    config = tiny_gemma2_config()
    del config.layer_types
    assert gemma_layer_types(config, default_pattern=2) == [SLIDING, FULL, SLIDING, FULL]
    config.layer_types = [SLIDING, "chunked_attention", SLIDING, FULL]
    with pytest.raises(ValueError, match="layer_types"):
        gemma_layer_types(config, default_pattern=2)
