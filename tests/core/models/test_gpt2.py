"""GPT-2 (learned positions, LayerNorm, GELU MLP, Conv1D weights) against transformers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2Config

from kvplane.testing.models import forward_logits, save_random_model

from .harness import check_architecture, load_tiny

TINY = dict(
    vocab_size=256,
    n_embd=64,
    n_layer=2,
    n_head=4,
    n_positions=512,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)


def randomize_norms_and_biases(model: torch.nn.Module) -> None:
    """LayerNorm weights and all biases start as constants in transformers; draw them."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias") or ".ln_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


@pytest.mark.parametrize(
    "variant", [{}, {"scale_attn_by_inverse_layer_idx": True, "tie_word_embeddings": False}]
)
def test_gpt2_matches_transformers(variant: dict[str, Any], tmp_path: Path) -> None:
    config = GPT2Config(**TINY, **variant)
    check_architecture(config, tmp_path, prepare_reference=randomize_norms_and_biases)


def test_gpt2_loads_unprefixed_checkpoint_names(tmp_path: Path) -> None:
    """The original ``gpt2`` upload: no ``transformer.`` prefix, the causal-mask buffers
    saved as ``h.N.attn.bias``, and the tied head's copy as ``lm_head.weight``."""
    reference = save_random_model(GPT2Config(**TINY), tmp_path)
    randomize_norms_and_biases(reference)
    reference.save_pretrained(str(tmp_path))
    (checkpoint,) = tmp_path.glob("*.safetensors")
    tensors = {
        name.removeprefix("transformer."): tensor
        for name, tensor in load_file(str(checkpoint)).items()
    }
    assert "h.0.attn.c_attn.weight" in tensors
    for layer in range(2):
        tensors[f"h.{layer}.attn.bias"] = torch.tril(torch.ones(1, 1, 512, 512))
    tensors["lm_head.weight"] = tensors["wte.weight"].clone()
    checkpoint.unlink()
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"]

    prompt = list(range(3, 40))
    with torch.inference_mode():
        expected = reference(torch.tensor([prompt])).logits[0]
    error = (forward_logits(load_tiny(tmp_path), prompt) - expected).abs().max().item()
    assert error <= 1e-4 * expected.abs().max().item()
