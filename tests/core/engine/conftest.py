"""Shared fixtures: the embedded SmolLM2 model in kvplane and in transformers (the oracle)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch

from kvplane import LLM
from kvplane.models.source import default_model_path
from kvplane.testing.models import hf_greedy_tokens

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
def smollm_llm() -> Iterator[LLM]:
    llm = make_llm()
    yield llm
    assert_no_block_leak(llm)


@pytest.fixture(scope="session")
def hf_smollm() -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    path = default_model_path()
    return AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="session")
def hf_greedy(hf_smollm: torch.nn.Module) -> Callable[[list[int], int], list[int]]:
    """Greedy continuation by transformers ``generate``, EOS suppressed (min_new_tokens)."""
    cache: dict[tuple[tuple[int, ...], int], list[int]] = {}

    def generate(prompt_token_ids: list[int], num_tokens: int) -> list[int]:
        key = (tuple(prompt_token_ids), num_tokens)
        if key not in cache:
            cache[key] = hf_greedy_tokens(hf_smollm, prompt_token_ids, num_tokens)
        return cache[key]

    return generate
