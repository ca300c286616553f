"""Mixtral (Mistral attention, top-2 of 4 experts in every layer) against transformers."""

from __future__ import annotations

from pathlib import Path

from transformers import MixtralConfig

from kvplane.models.layers.moe import FusedMoE

from .harness import check_architecture
from .moe_helpers import scale_moe_weights

TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    num_local_experts=4,
    num_experts_per_tok=2,
    tie_word_embeddings=False,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)


def test_mixtral_matches_transformers(tmp_path: Path) -> None:
    config = MixtralConfig(sliding_window=16, **TINY)
    llm = check_architecture(config, tmp_path, prepare_reference=scale_moe_weights)
    layers = llm.engine.runner.model.model.layers
    assert all(isinstance(layer.mlp, FusedMoE) and layer.mlp.renormalize for layer in layers)
    assert [layer.self_attn.attn.spec.sliding_window for layer in layers] == [16, 16]


def test_mixtral_top_1_of_3_with_gelu_matches_transformers(tmp_path: Path) -> None:
    options = {**TINY, "num_local_experts": 3, "num_experts_per_tok": 1}
    config = MixtralConfig(sliding_window=None, hidden_act="gelu_pytorch_tanh", **options)
    check_architecture(config, tmp_path, prepare_reference=scale_moe_weights)
