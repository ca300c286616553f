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


def hf_greedy_tokens(model: Any, prompt_token_ids: list[int], num_tokens: int) -> list[int]:
    """The oracle: ``num_tokens`` greedy tokens of the transformers ``model`` after
    ``prompt_token_ids``, EOS suppressed (``min_new_tokens``) as kvplane's ``min_tokens``
    suppresses it."""
    import torch

    with torch.inference_mode():
        output = model.generate(
            torch.tensor([prompt_token_ids]),
            attention_mask=torch.ones(1, len(prompt_token_ids), dtype=torch.long),
            max_new_tokens=num_tokens,
            min_new_tokens=num_tokens,
            do_sample=False,
        )
    return output[0, len(prompt_token_ids) :].tolist()


def forward_logits(llm: Any, token_ids: list[int]) -> Any:
    """Logits ``[len(token_ids), vocab_size]`` (float32) of one prefill of ``token_ids``
    through ``llm``'s model and KV cache, for comparing every position with an oracle.

    The engine must be idle; the prefix cache is reset before and after, since the pass
    writes into free blocks.
    """
    import math

    import torch

    from kvplane.attention.metadata import AttentionMetadata

    engine = llm.engine
    if engine.has_unfinished_requests():
        raise RuntimeError("forward_logits needs an idle engine")
    block_manager = engine.scheduler.block_manager
    block_size = engine.config.block_size
    num_tokens = len(token_ids)
    num_blocks = math.ceil(num_tokens / block_size)
    if num_blocks > block_manager.num_blocks:
        raise ValueError("the prompt does not fit in the KV cache")
    device = engine.device
    block_manager.reset_prefix_cache()
    positions = torch.arange(num_tokens, device=device)
    metadata = AttentionMetadata(
        slot_mapping=positions.clone(),  # blocks 0..num_blocks-1, in order
        query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32, device=device),
        seq_lens=torch.tensor([num_tokens], dtype=torch.int32, device=device),
        block_tables=torch.arange(num_blocks, dtype=torch.int32, device=device)[None],
        max_query_len=num_tokens,
        max_seq_len=num_tokens,
        query_start_loc_cpu=(0, num_tokens),
        seq_lens_cpu=(num_tokens,),
    )
    model = engine.runner.model
    with torch.inference_mode():
        hidden = model(torch.tensor(token_ids, device=device), positions, metadata)
        logits = model.compute_logits(hidden)
    block_manager.reset_prefix_cache()
    return logits
