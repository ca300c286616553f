"""Engine features on the real SmolLM2 model: seeds, n > 1, logprobs, stops, aborts."""

from __future__ import annotations

import math

import pytest
import torch

from kvplane import LLM, SamplingParams

from .conftest import PROMPTS, assert_no_block_leak

pytestmark = pytest.mark.slow


def test_seed_gives_same_tokens_alone_and_in_a_batch_of_16(smollm_llm: LLM) -> None:
    seeded = SamplingParams(temperature=0.8, top_p=0.95, top_k=50, seed=1234, max_tokens=24)
    alone = smollm_llm.generate(PROMPTS[0], seeded)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=1.0, max_tokens=24) for _ in range(15)]
    batch = smollm_llm.generate(
        [PROMPTS[0], *(PROMPTS[i % len(PROMPTS)] for i in range(15))], [seeded, *others]
    )
    assert batch[0].outputs[0].token_ids == alone
    assert_no_block_leak(smollm_llm)


def test_parallel_sampling_shares_the_prompt(smollm_llm: LLM) -> None:
    params = SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=16)
    output = smollm_llm.generate(PROMPTS[1], params)[0]
    assert [c.index for c in output.outputs] == [0, 1, 2, 3]
    token_lists = [tuple(c.token_ids) for c in output.outputs]
    assert all(
        len(tokens) == 16 or c.finish_reason == "stop"
        for tokens, c in zip(token_lists, output.outputs, strict=True)
    )
    assert len(set(token_lists)) > 1  # independent samples
    assert_no_block_leak(smollm_llm)


def test_greedy_parallel_samples_are_identical(smollm_llm: LLM) -> None:
    params = SamplingParams(n=3, temperature=0.0, max_tokens=12, min_tokens=12)
    output = smollm_llm.generate(PROMPTS[2], params)[0]
    single = smollm_llm.generate(
        PROMPTS[2], SamplingParams(temperature=0.0, max_tokens=12, min_tokens=12)
    )[0]
    for completion in output.outputs:
        assert completion.token_ids == single.outputs[0].token_ids


def test_logprobs_match_the_model_distribution(smollm_llm: LLM, hf_smollm) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=4, logprobs=3, prompt_logprobs=2)
    output = smollm_llm.generate(PROMPTS[0], params)[0]
    prompt_ids = output.prompt_token_ids
    completion = output.outputs[0]
    assert completion.logprobs is not None and len(completion.logprobs) == 4
    all_ids = prompt_ids + completion.token_ids
    with torch.inference_mode():
        logits = hf_smollm(torch.tensor([all_ids])).logits[0].float()
    reference = torch.log_softmax(logits, dim=-1)
    for step, entry in enumerate(completion.logprobs):
        position = len(prompt_ids) - 1 + step
        token_id = completion.token_ids[step]
        assert token_id in entry and entry[token_id].rank == 1  # greedy picks the top
        assert len(entry) == 3  # the sampled token is also the top-1
        for candidate, logprob in entry.items():
            assert math.isclose(
                logprob.logprob, reference[position, candidate].item(), abs_tol=1e-3
            )
    assert output.prompt_logprobs is not None
    assert output.prompt_logprobs[0] is None
    assert len(output.prompt_logprobs) == len(prompt_ids)
    for position in range(1, len(prompt_ids)):
        entry = output.prompt_logprobs[position]
        assert entry is not None and prompt_ids[position] in entry
        assert math.isclose(
            entry[prompt_ids[position]].logprob,
            reference[position - 1, prompt_ids[position]].item(),
            abs_tol=1e-3,
        )
    cumulative = sum(
        e[t].logprob for e, t in zip(completion.logprobs, completion.token_ids, strict=True)
    )
    assert math.isclose(completion.cumulative_logprob, cumulative, rel_tol=1e-6)


def test_stop_string_is_excluded_from_the_text(smollm_llm: LLM) -> None:
    free = smollm_llm.generate(PROMPTS[2], SamplingParams(temperature=0.0, max_tokens=24))
    text = free[0].outputs[0].text
    assert " 7," in text  # the model counts on
    stopped = smollm_llm.generate(
        PROMPTS[2], SamplingParams(temperature=0.0, max_tokens=24, stop=[" 7,"])
    )[0].outputs[0]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == " 7,"
    assert stopped.text == text[: text.index(" 7,")]


def test_stop_token_ids_and_max_tokens(smollm_llm: LLM) -> None:
    tokenizer = smollm_llm.get_tokenizer()
    free = smollm_llm.generate(PROMPTS[2], SamplingParams(temperature=0.0, max_tokens=10))
    third = free[0].outputs[0].token_ids[2]
    stopped = smollm_llm.generate(
        PROMPTS[2], SamplingParams(temperature=0.0, max_tokens=10, stop_token_ids=[third])
    )[0].outputs[0]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == third
    assert stopped.token_ids == free[0].outputs[0].token_ids[:3]
    assert free[0].outputs[0].finish_reason == "length"
    assert tokenizer is not None


def test_abort_frees_blocks_at_once(smollm_llm: LLM) -> None:
    engine = smollm_llm.engine
    block_manager = engine.scheduler.block_manager
    params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    for index, prompt in enumerate(PROMPTS):
        engine.add_request(f"abort-{index}", prompt, params)
    for _ in range(3):
        engine.step()
    assert block_manager.num_free_blocks < block_manager.num_blocks
    engine.abort_request([f"abort-{index}" for index in range(len(PROMPTS))])
    assert_no_block_leak(smollm_llm)


def test_chat_applies_the_template(smollm_llm: LLM) -> None:
    messages = [{"role": "user", "content": "Say hello."}]
    output = smollm_llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=8))[0]
    expected = smollm_llm.get_tokenizer().apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    assert smollm_llm.get_tokenizer().decode(output.prompt_token_ids) == expected
    assert output.outputs[0].text


def test_bad_prompts_are_rejected_without_harm(smollm_llm: LLM) -> None:
    with pytest.raises(ValueError, match="empty"):
        smollm_llm.generate({"prompt_token_ids": []})
    with pytest.raises(ValueError, match="vocabulary"):
        smollm_llm.generate({"prompt_token_ids": [10**9]})
    with pytest.raises(ValueError, match="context"):
        smollm_llm.generate({"prompt_token_ids": [1] * 5000})
    assert smollm_llm.generate(PROMPTS[0], SamplingParams(max_tokens=2))[0].finished
    assert_no_block_leak(smollm_llm)
