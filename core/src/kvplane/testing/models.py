"""Tiny random-weight models built from real transformers configs, for tests.

Nothing is downloaded: the config class comes from transformers and the weights from a
seeded generator, saved as safetensors the way a Hugging Face checkpoint is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def tiny_llama_config(**overrides: Any) -> Any:
    """A 2-layer Llama config with GQA, small enough for interpreted kernels."""
    from transformers import LlamaConfig

    options: dict[str, Any] = dict(
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
    options.update(overrides)
    return LlamaConfig(**options)


def save_random_model(config: Any, directory: Path, seed: int = 0) -> Any:
    """Build the transformers model for ``config`` with seeded random weights, save it
    under ``directory`` (config.json + safetensors) and return it in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.save_pretrained(str(directory))
    return model
