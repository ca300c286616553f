"""Shared fixtures: the embedded SmolLM2 model in transformers (the oracle), a tiny model
with SmolLM2's tokenizer, and helpers for SmolLM2 engines (the session's own,
``smollm_llm``, is in ``tests/core/conftest.py``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from kvplane import LLM
from kvplane.models.config import load_tokenizer
from kvplane.models.source import default_model_path, resolve_model
from kvplane.testing.models import save_random_model, tiny_llama_config

#: Varied prompts: prose, code, lists, chat-like, a non-ASCII one.
PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "1, 2, 3, 4,",
    "def fibonacci(n):",
    "Hello! How are you today?",
    "Translate to French: good morning, my friend",
    "List three colors:",
    "Café, naïve, 東京 and emoji 🙂 are all",
]

#: KV cache for the tests: room for every batch the tests run.
KV_CACHE_BYTES = 256 * 2**20


def make_llm(**options: object) -> LLM:
    """SmolLM2 on the cpu platform in float32, with test-sized KV cache by default."""
    options.setdefault("kv_cache_memory_bytes", KV_CACHE_BYTES)
    options.setdefault("max_model_len", 1024)
    return LLM(device="cpu", dtype="float32", **options)  # type: ignore[arg-type]


def assert_no_block_leak(llm: LLM) -> None:
    """Every block is free or cached: nothing is still referenced."""
    block_manager = llm.engine.scheduler.block_manager
    block_manager.check_invariants()
    assert not llm.engine.has_unfinished_requests()
    assert block_manager.num_free_blocks == block_manager.num_blocks


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random-weight Llama (``tiny_llama_config()``), no tokenizer: shared by
    the engine tests that need any small model and never write into its folder (a file
    that needs its own model, e.g. with a generation config, defines ``model_dir``)."""
    directory = tmp_path_factory.mktemp("tiny")
    save_random_model(tiny_llama_config(), directory)
    return directory


@pytest.fixture(scope="session")
def tiny_smollm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random-weight Llama with SmolLM2's vocabulary and tokenizer: text prompts
    and detokenized outputs like SmolLM2's, for tests of engine bookkeeping that need many
    steps but not SmolLM2's weights (a step costs a fraction of SmolLM2's)."""
    directory = tmp_path_factory.mktemp("tiny-smollm")
    tokenizer = load_tokenizer(resolve_model(None, "auto"))  # cached: the engines' own
    save_random_model(tiny_llama_config(vocab_size=len(tokenizer)), directory)
    tokenizer.save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="session")
def hf_smollm() -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    path = default_model_path()
    return AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="session")
def hf_greedy_choices(hf_smollm: torch.nn.Module) -> Callable[[list[int], list[int]], list[int]]:
    """transformers' greedy pick at each position of ``token_ids`` after the prompt, EOS
    suppressed as ``generate``'s ``min_new_tokens`` suppresses it.

    One forward pass over prompt + ``token_ids`` (teacher forcing) instead of ``generate``
    (a pass per token, ten times the cost): ``token_ids`` is transformers' greedy
    continuation exactly when the picks equal it, and the first difference is where the
    continuations part. Cached per session: several tests check the same outputs.
    """
    eos = hf_smollm.generation_config.eos_token_id
    suppressed_ids = [eos] if isinstance(eos, int) else list(eos or [])
    cache: dict[tuple[tuple[int, ...], tuple[int, ...]], list[int]] = {}

    def choices(prompt_token_ids: list[int], token_ids: list[int]) -> list[int]:
        key = (tuple(prompt_token_ids), tuple(token_ids))
        if key not in cache:
            with torch.inference_mode():
                input_ids = torch.tensor([prompt_token_ids + token_ids[:-1]])
                # [len(token_ids), vocab_size]: the logits that choose each of token_ids
                logits = hf_smollm(input_ids).logits[0, len(prompt_token_ids) - 1 :]
                logits[:, suppressed_ids] = float("-inf")
                cache[key] = logits.argmax(dim=-1).tolist()
        return cache[key]

    return choices
