"""Phi-3 (fused checkpoint matrices, partial rotary, LongRoPE) against transformers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import Phi3Config

from kvplane import SamplingParams
from kvplane.attention.metadata import AttentionMetadata
from kvplane.models.layers.linear import Linear
from kvplane.testing.models import forward_logits, save_random_model

from .harness import RELATIVE_TOLERANCE, check_architecture, hf_greedy, load_tiny

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
# head_dim 16, partial_rotary_factor 0.5: rotary over 8 channels, 4 frequencies.
LONGROPE = {
    "rope_type": "longrope",
    "rope_theta": 10000.0,
    "partial_rotary_factor": 0.5,
    "short_factor": [1.0, 1.3, 2.1, 3.7],
    "long_factor": [2.0, 5.0, 11.0, 29.0],
}


def phi3_config(**overrides: Any) -> Phi3Config:
    return Phi3Config(**{**TINY, **overrides})


def test_phi3_partial_rotary_matches_transformers(tmp_path: Path) -> None:
    parameters = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    llm = check_architecture(phi3_config(rope_parameters=parameters), tmp_path)
    cos_sin = llm.engine.runner.model.model.layers[0].self_attn.rotary_emb.cos_sin_cache
    assert cos_sin.shape[-1] == 8


def test_phi3_sliding_window_matches_transformers(tmp_path: Path) -> None:
    check_architecture(phi3_config(sliding_window=8), tmp_path)


def test_phi3_longrope_short_regime_matches_transformers(tmp_path: Path) -> None:
    # Every sequence (prompts up to 50 plus 32 generated) stays within the original
    # context, so transformers uses the short factors throughout.
    check_architecture(
        phi3_config(rope_parameters=LONGROPE, original_max_position_embeddings=128), tmp_path
    )


def test_phi3_longrope_long_regime_matches_transformers(tmp_path: Path) -> None:
    # Prompts longer than the original context of 16: long factors from the prefill on.
    config = phi3_config(rope_parameters=LONGROPE, original_max_position_embeddings=16)
    reference = save_random_model(config, tmp_path)
    llm = load_tiny(tmp_path)
    generator = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(0, 256, (length,), generator=generator).tolist() for length in (17, 40)
    ]

    with torch.inference_mode():
        expected_logits = reference(torch.tensor([prompts[1]])).logits[0]
    error = (forward_logits(llm, prompts[1]) - expected_logits).abs().max().item()
    scale = expected_logits.abs().max().item()
    assert error <= RELATIVE_TOLERANCE * scale, f"logits differ: {error} vs scale {scale}"

    params = SamplingParams(temperature=0.0, max_tokens=16, min_tokens=16, detokenize=False)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    for prompt, output in zip(prompts, outputs, strict=True):
        expected = hf_greedy(reference, prompt, 16)
        assert list(output.outputs[0].token_ids) == expected, f"prompt of {len(prompt)}"


def test_phi3_longrope_table_rows_follow_sequence_length(tmp_path: Path) -> None:
    config = phi3_config(rope_parameters=LONGROPE, original_max_position_embeddings=16)
    save_random_model(config, tmp_path)
    model = load_tiny(tmp_path).engine.runner.model
    rotary = model.model.layers[0].self_attn.rotary_emb
    assert all(layer.self_attn.rotary_emb is rotary for layer in model.model.layers)
    # A decode token at position 20 (long), a 3-token chunk ending at 16 (short).
    positions = torch.tensor([20, 13, 14, 15])
    metadata = AttentionMetadata(
        slot_mapping=positions.clone(),
        query_start_loc=torch.tensor([0, 1, 4], dtype=torch.int32),
        seq_lens=torch.tensor([21, 16], dtype=torch.int32),
        block_tables=torch.zeros(2, 4, dtype=torch.int32),
        max_query_len=3,
        max_seq_len=21,
        query_start_loc_cpu=(0, 1, 4),
        seq_lens_cpu=(21, 16),
    )
    assert rotary.table_rows(positions, metadata).tolist() == [20 + 512, 13, 14, 15]


def test_fused_checkpoint_tensor_fills_every_shard(tmp_path: Path) -> None:
    save_random_model(phi3_config(), tmp_path)
    model = load_tiny(tmp_path).engine.runner.model
    layer: Linear = model.model.layers[0].mlp.gate_up_proj
    fused = torch.arange(256 * 64, dtype=torch.float32).reshape(256, 64)
    layer.load_fused("weight", fused)
    assert torch.equal(layer.weight, fused)
    with pytest.raises(ValueError, match=r"fused weight has shape \(255, 64\)"):
        layer.load_fused("weight", fused[:255])
