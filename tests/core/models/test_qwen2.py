"""Qwen 2 (q/k/v bias, optional per-layer sliding windows) against transformers."""

from __future__ import annotations

from pathlib import Path

from transformers import Qwen2Config

from .harness import check_architecture, randomize_biases

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


def test_qwen2_matches_transformers(tmp_path: Path) -> None:
    config = Qwen2Config(tie_word_embeddings=True, **TINY)
    llm = check_architecture(config, tmp_path, prepare_reference=randomize_biases)
    attention = llm.engine.runner.model.model.layers[0].self_attn
    assert attention.qkv_proj.bias is not None and attention.o_proj.bias is None
    assert attention.attn.spec.sliding_window is None


def test_qwen2_sliding_window_layers_match_transformers(tmp_path: Path) -> None:
    # transformers makes layers at or past max_window_layers sliding.
    config = Qwen2Config(
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=1,
        tie_word_embeddings=False,
        **TINY,
    )
    llm = check_architecture(config, tmp_path, prepare_reference=randomize_biases)
    windows = [
        layer.self_attn.attn.spec.sliding_window for layer in llm.engine.runner.model.model.layers
    ]
    assert windows == [None, 8]
