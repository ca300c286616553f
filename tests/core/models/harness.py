"""The oracle check every architecture passes: kvplane vs transformers, float32.

Build a tiny random-weight model from the real transformers config class, save it as
safetensors, load it in kvplane; logits of a prefill must match within 1e-4 relative
and greedy tokens of a batch of mixed-length prompts must be identical.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kvplane import LLM, SamplingParams
from kvplane.testing.models import forward_logits, hf_greedy_tokens, save_random_model

PROMPT_LENGTHS = (1, 7, 19, 33, 50)
RELATIVE_TOLERANCE = 1e-4


def load_tiny(directory: Path, **options: Any) -> LLM:
    options.setdefault("kv_cache_memory_bytes", 8 * 2**20)
    options.setdefault("max_num_batched_tokens", 64)
    return LLM(
        model=str(directory), device="cpu", dtype="float32", skip_tokenizer_init=True, **options
    )


def random_prompts(vocab_size: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, vocab_size, (length,), generator=generator).tolist()
        for length in PROMPT_LENGTHS
    ]


hf_greedy = hf_greedy_tokens


def randomize_norm_weights(model: torch.nn.Module, seed: int = 1) -> None:
    """Draw every norm weight from N(0, 0.5): transformers initialises them to constants
    (ones, or zeros for Gemma's ``1 + weight``), which would hide a mixed-up norm."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


def randomize_biases(model: torch.nn.Module, seed: int = 2) -> None:
    """Draw every bias from N(0, 0.5): transformers initialises them to zeros, which
    would hide a bias loaded into the wrong shard, or not applied at all."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


def check_architecture(
    config: Any,
    directory: Path,
    num_tokens: int = 32,
    prepare_reference: Callable[[torch.nn.Module], None] | None = None,
    **options: Any,
) -> LLM:
    """Assert kvplane matches transformers on ``config``; returns the kvplane LLM.

    ``prepare_reference`` (e.g. :func:`randomize_norm_weights`) may change the random
    transformers model in place before it is saved for kvplane.
    """
    reference = save_random_model(config, directory)
    if prepare_reference is not None:
        prepare_reference(reference)
        reference.save_pretrained(str(directory))
    llm = load_tiny(directory, **options)
    prompts = random_prompts(config.vocab_size)

    longest = max(prompts, key=len)
    with torch.inference_mode():
        expected_logits = reference(torch.tensor([longest])).logits[0].float()
    logits = forward_logits(llm, longest)
    error = (logits - expected_logits).abs().max().item()
    scale = expected_logits.abs().max().item()
    assert error <= RELATIVE_TOLERANCE * scale, f"logits differ: {error} vs scale {scale}"

    params = SamplingParams(
        temperature=0.0, max_tokens=num_tokens, min_tokens=num_tokens, detokenize=False
    )
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    for prompt, output in zip(prompts, outputs, strict=True):
        assert list(output.outputs[0].token_ids) == hf_greedy(reference, prompt, num_tokens), (
            f"greedy tokens differ for a prompt of {len(prompt)} tokens"
        )
    return llm
