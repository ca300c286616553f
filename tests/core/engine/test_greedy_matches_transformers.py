"""Greedy output of the whole engine is token-identical to transformers (float32).

SmolLM2-135M-Instruct from the embedded GGUF, 8 varied prompts x 64 tokens, in a batch,
one at a time, under a 16-token chunked-prefill budget, under a KV budget that forces
preemption, and with prefix caching on prompts sharing a long prefix. Each output is
checked against transformers' greedy pick at every position (one teacher-forced pass, see
``hf_greedy_choices``).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from kvplane import LLM, SamplingParams

from .conftest import PROMPTS, assert_no_block_leak, make_llm

pytestmark = pytest.mark.slow

NUM_TOKENS = 64
# min_tokens = max_tokens suppresses EOS exactly like transformers' min_new_tokens.
GREEDY = SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, min_tokens=NUM_TOKENS)

HFChoices = Callable[[list[int], list[int]], list[int]]


def hf_choices(
    llm: LLM, hf_greedy_choices: HFChoices, prompts: list[str], generated: list[list[int]]
) -> list[list[int]]:
    """transformers' greedy picks along each generated sequence: equal to ``generated``
    exactly when kvplane's output is transformers' greedy output."""
    tokenizer = llm.get_tokenizer()
    return [
        hf_greedy_choices(tokenizer.encode(prompt), tokens)
        for prompt, tokens in zip(prompts, generated, strict=True)
    ]


def assert_matches_transformers(llm: LLM, hf_greedy_choices: HFChoices, prompts: list[str]) -> None:
    generated = generated_tokens(llm, prompts)
    assert generated == hf_choices(llm, hf_greedy_choices, prompts, generated)


def generated_tokens(llm: LLM, prompts: list[str]) -> list[list[int]]:
    outputs = llm.generate(prompts, GREEDY)
    assert [o.prompt for o in outputs] == prompts  # input order kept
    for output in outputs:
        assert output.finished
        assert output.outputs[0].finish_reason == "length"
        assert len(output.outputs[0].token_ids) == NUM_TOKENS
    return [list(output.outputs[0].token_ids) for output in outputs]


def test_batch_matches_transformers(smollm_llm: LLM, hf_greedy_choices: HFChoices) -> None:
    assert_matches_transformers(smollm_llm, hf_greedy_choices, PROMPTS)
    assert_no_block_leak(smollm_llm)


def test_one_at_a_time_matches(smollm_llm: LLM, hf_greedy_choices: HFChoices) -> None:
    for prompt in PROMPTS:
        assert_matches_transformers(smollm_llm, hf_greedy_choices, [prompt])
    assert_no_block_leak(smollm_llm)


def test_text_is_the_decoded_tokens(smollm_llm: LLM) -> None:
    output = smollm_llm.generate(PROMPTS[-1], GREEDY)[0].outputs[0]
    tokenizer = smollm_llm.get_tokenizer()
    assert output.text == tokenizer.decode(output.token_ids, skip_special_tokens=True)


def test_chunked_prefill_budget_16_matches(hf_greedy_choices: HFChoices) -> None:
    llm = make_llm(max_num_batched_tokens=16)
    assert_matches_transformers(llm, hf_greedy_choices, PROMPTS)
    assert_no_block_leak(llm)


def test_preemption_keeps_outputs_identical(smollm_llm: LLM, hf_greedy_choices: HFChoices) -> None:
    # 16 blocks of 16 tokens: far less than 8 prompts x (prompt + 64) tokens.
    bytes_per_block = smollm_llm.engine.runner.bytes_per_block()
    llm = make_llm(max_model_len=256, kv_cache_memory_bytes=16 * bytes_per_block)
    assert_matches_transformers(llm, hf_greedy_choices, PROMPTS)
    assert llm.engine.stats().num_preemptions_total > 0
    assert_no_block_leak(llm)


def test_prefix_caching_hits_and_matches(smollm_llm: LLM, hf_greedy_choices: HFChoices) -> None:
    shared = (
        "You are a careful assistant. Answer in one short sentence, plainly, without "
        "lists or markdown, and never repeat the question. Think about the reader. "
    ) * 2
    prompts = [
        shared + question
        for question in ("What is rain?", "Why is the sky blue?", "What do bees make?")
    ]
    # Only the prompts' blocks are shared: one output token is enough where nothing is
    # compared with transformers.
    one_token = SamplingParams(temperature=0.0, max_tokens=1)
    # Warm the cache with the first prompt, then run all three together.
    smollm_llm.generate(prompts[:1], one_token)
    hits_before = smollm_llm.engine.stats().prefix_cache_hits
    assert_matches_transformers(smollm_llm, hf_greedy_choices, prompts)
    assert smollm_llm.engine.stats().prefix_cache_hits > hits_before
    outputs = smollm_llm.generate(prompts[1:2], one_token)
    assert outputs[0].num_cached_tokens >= 64
    assert_no_block_leak(smollm_llm)


def test_native_gguf_matches_transformers(smollm_llm: LLM, hf_greedy_choices: HFChoices) -> None:
    # The projections stay in the file's Q4_1 blocks, dequantized inside each product:
    # the same weights as transformers' GGUF loader gives, in a third of the memory.
    native = make_llm(quantization="gguf")
    layer = native.engine.runner.model.model.layers[0].self_attn.qkv_proj
    assert layer.quant_method.name == "gguf" and layer.gguf_weight_0.dtype == torch.uint8
    assert_matches_transformers(native, hf_greedy_choices, PROMPTS[:4])

    def weight_bytes(llm: LLM) -> int:
        return sum(p.numel() * p.element_size() for p in llm.engine.runner.model.parameters())

    assert weight_bytes(native) < 0.4 * weight_bytes(smollm_llm)
    assert_no_block_leak(native)
