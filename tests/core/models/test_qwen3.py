"""Qwen 3 (per-head q/k RMSNorm, explicit head_dim) against transformers."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Qwen3Config

from .harness import check_architecture, randomize_biases, randomize_norm_weights

TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)


def randomize_norms_and_biases(model: torch.nn.Module) -> None:
    randomize_norm_weights(model)
    randomize_biases(model)


def test_qwen3_matches_transformers(tmp_path: Path) -> None:
    # head_dim 32 differs from hidden_size / heads (16), as in the real Qwen 3 sizes.
    config = Qwen3Config(head_dim=32, tie_word_embeddings=True, **TINY)
    llm = check_architecture(config, tmp_path, prepare_reference=randomize_norm_weights)
    attention = llm.engine.runner.model.model.layers[0].self_attn
    assert attention.head_size == 32 and attention.q_norm is not None


def test_qwen3_with_bias_and_sliding_window_matches_transformers(tmp_path: Path) -> None:
    config = Qwen3Config(
        head_dim=32,
        attention_bias=True,
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=1,
        tie_word_embeddings=False,
        **TINY,
    )
    llm = check_architecture(config, tmp_path, prepare_reference=randomize_norms_and_biases)
    windows = [
        layer.self_attn.attn.spec.sliding_window for layer in llm.engine.runner.model.model.layers
    ]
    assert windows == [None, 8]
