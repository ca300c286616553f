"""Greedy output of the whole engine is token-identical to transformers (float32).

SmolLM2-135M-Instruct from the embedded GGUF, 8 varied prompts x 64 tokens, in a batch,
one at a time, under a 16-token chunked-prefill budget, under a KV budget that forces
preemption, and with prefix caching on prompts sharing a long prefix.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from kvplane import LLM, SamplingParams

from .conftest import PROMPTS, assert_no_block_leak, make_llm

pytestmark = pytest.mark.slow

NUM_TOKENS = 64
# min_tokens = max_tokens suppresses EOS exactly like transformers' min_new_tokens.
GREEDY = SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, min_tokens=NUM_TOKENS)

HFGreedy = Callable[[list[int], int], list[int]]


def expected_tokens(llm: LLM, hf_greedy: HFGreedy, prompts: list[str]) -> list[list[int]]:
    tokenizer = llm.get_tokenizer()
    return [hf_greedy(tokenizer.encode(prompt), NUM_TOKENS) for prompt in prompts]


def generated_tokens(llm: LLM, prompts: list[str]) -> list[list[int]]:
    outputs = llm.generate(prompts, GREEDY)
    assert [o.prompt for o in outputs] == prompts  # input order kept
    for output in outputs:
        assert output.finished
        assert output.outputs[0].finish_reason == "length"
    return [list(output.outputs[0].token_ids) for output in outputs]


def test_batch_matches_transformers(smollm_llm: LLM, hf_greedy: HFGreedy) -> None:
    assert generated_tokens(smollm_llm, PROMPTS) == expected_tokens(smollm_llm, hf_greedy, PROMPTS)
    assert_no_block_leak(smollm_llm)


def test_one_at_a_time_matches(smollm_llm: LLM, hf_greedy: HFGreedy) -> None:
    expected = expected_tokens(smollm_llm, hf_greedy, PROMPTS)
    for prompt, tokens in zip(PROMPTS, expected, strict=True):
        assert generated_tokens(smollm_llm, [prompt]) == [tokens]
    assert_no_block_leak(smollm_llm)


def test_text_is_the_decoded_tokens(smollm_llm: LLM) -> None:
    output = smollm_llm.generate(PROMPTS[-1], GREEDY)[0].outputs[0]
    tokenizer = smollm_llm.get_tokenizer()
    assert output.text == tokenizer.decode(output.token_ids, skip_special_tokens=True)


def test_chunked_prefill_budget_16_matches(hf_greedy: HFGreedy) -> None:
    llm = make_llm(max_num_batched_tokens=16)
    assert generated_tokens(llm, PROMPTS) == expected_tokens(llm, hf_greedy, PROMPTS)
    assert_no_block_leak(llm)


def test_preemption_keeps_outputs_identical(smollm_llm: LLM, hf_greedy: HFGreedy) -> None:
    # 16 blocks of 16 tokens: far less than 8 prompts x (prompt + 64) tokens.
    bytes_per_block = smollm_llm.engine.runner.bytes_per_block()
    llm = make_llm(max_model_len=256, kv_cache_memory_bytes=16 * bytes_per_block)
    assert generated_tokens(llm, PROMPTS) == expected_tokens(llm, hf_greedy, PROMPTS)
    assert llm.engine.stats().num_preemptions_total > 0
    assert_no_block_leak(llm)


def test_prefix_caching_hits_and_matches(smollm_llm: LLM, hf_greedy: HFGreedy) -> None:
    shared = (
        "You are a careful assistant. Answer in one short sentence, plainly, without "
        "lists or markdown, and never repeat the question. Think about the reader. "
    ) * 2
    prompts = [
        shared + question
        for question in ("What is rain?", "Why is the sky blue?", "What do bees make?")
    ]
    # Warm the cache with the first prompt, then run all three together.
    generated_tokens(smollm_llm, prompts[:1])
    hits_before = smollm_llm.engine.stats().prefix_cache_hits
    assert generated_tokens(smollm_llm, prompts) == expected_tokens(smollm_llm, hf_greedy, prompts)
    assert smollm_llm.engine.stats().prefix_cache_hits > hits_before
    outputs = smollm_llm.generate(prompts[1:2], GREEDY)
    assert outputs[0].num_cached_tokens >= 64
    assert_no_block_leak(smollm_llm)
