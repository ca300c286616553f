"""Mistral (sliding-window attention on every layer) against transformers."""

from __future__ import annotations

from pathlib import Path

from transformers import MistralConfig

from .harness import check_architecture

TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=False,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)


def test_mistral_sliding_window_matches_transformers(tmp_path: Path) -> None:
    # A window of 8 is far shorter than the longer prompts and generations, so a model
    # that ignored it would diverge.
    llm = check_architecture(MistralConfig(sliding_window=8, **TINY), tmp_path)
    windows = [
        layer.self_attn.attn.spec.sliding_window for layer in llm.engine.runner.model.model.layers
    ]
    assert windows == [8, 8]


def test_mistral_without_window_matches_transformers(tmp_path: Path) -> None:
    check_architecture(MistralConfig(sliding_window=None, **TINY), tmp_path)
