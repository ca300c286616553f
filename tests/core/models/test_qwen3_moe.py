"""Qwen3-MoE (q/k norm, experts with optional top-k renormalisation, dense layers via
``mlp_only_layers`` / ``decoder_sparse_step``) against transformers."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Qwen3MoeConfig

from kvplane.models.layers.moe import FusedMoE
from kvplane.testing.models import forward_logits

from .harness import RELATIVE_TOLERANCE, check_architecture, random_prompts
from .moe_helpers import scale_moe_weights

TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    num_experts=4,
    num_experts_per_tok=2,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)


def _mlp_kinds(llm: object) -> list[str]:
    layers = llm.engine.runner.model.model.layers  # type: ignore[attr-defined]
    return ["moe" if isinstance(layer.mlp, FusedMoE) else "dense" for layer in layers]


def test_qwen3_moe_with_a_dense_layer_matches_transformers(tmp_path: Path) -> None:
    config = Qwen3MoeConfig(
        norm_topk_prob=False, mlp_only_layers=[1], head_dim=32, tie_word_embeddings=False, **TINY
    )
    llm = check_architecture(config, tmp_path, prepare_reference=scale_moe_weights)
    assert _mlp_kinds(llm) == ["moe", "dense", "moe"]

    # The check is sensitive to routing: renormalising the top-k weights (which this
    # config does not) moves the logits far past the tolerance.
    longest = max(random_prompts(config.vocab_size), key=len)
    logits = forward_logits(llm, longest)
    for layer in llm.engine.runner.model.model.layers:
        if isinstance(layer.mlp, FusedMoE):
            layer.mlp.renormalize = True
    changed = forward_logits(llm, longest)
    assert (changed - logits).abs().max() > 100 * RELATIVE_TOLERANCE * logits.abs().max()


def test_qwen3_moe_renormalised_every_other_layer_matches_transformers(tmp_path: Path) -> None:
    config = Qwen3MoeConfig(
        norm_topk_prob=True,
        decoder_sparse_step=2,
        mlp_only_layers=[],
        tie_word_embeddings=True,
        **TINY,
    )
    llm = check_architecture(config, tmp_path, prepare_reference=scale_moe_weights)
    assert _mlp_kinds(llm) == ["dense", "moe", "dense"]
    assert torch.equal(
        llm.engine.runner.model.lm_head.tied_to.weight,
        llm.engine.runner.model.model.embed_tokens.weight,
    )
