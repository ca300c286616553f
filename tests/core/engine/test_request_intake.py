"""``LLM.generate`` queues its requests as the steps need them (``_RequestIntake``): the
engine holds a bounded backlog, the outputs are those of queuing everything at once, and
a prompt that cannot be served still fails the call and leaves nothing behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvplane import LLM, SamplingParams
from kvplane.engine.llm import _RequestIntake
from kvplane.engine.outputs import RequestOutput

from .conftest import assert_no_block_leak

#: Small steps, so that 40 prompts of 24 tokens take many of them to prefill.
MAX_NUM_BATCHED_TOKENS = 32
PROMPT_LEN = 24


def _llm(model_dir: Path) -> LLM:
    return LLM(
        str(model_dir), device="cpu", dtype="float32", skip_tokenizer_init=True,
        kv_cache_memory_bytes=2**22, max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS,
        max_num_seqs=64,
    )  # fmt: skip


def _prompts(count: int) -> list[dict[str, list[int]]]:
    return [
        {"prompt_token_ids": [(7 * i + j) % 200 + 1 for j in range(PROMPT_LEN)]}
        for i in range(count)
    ]


def _greedy(max_tokens: int = 4) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)


def test_requests_go_in_as_the_steps_need_them(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    llm = _llm(model_dir)
    queued_before_step: list[int] = []
    step = llm.engine.step

    def counting_step() -> list[RequestOutput]:
        queued_before_step.append(llm.engine.scheduler.num_waiting)
        return step()

    monkeypatch.setattr(llm.engine, "step", counting_step)
    outputs = llm.generate(_prompts(40), _greedy())
    assert [len(o.outputs[0].token_ids) for o in outputs] == [4] * 40
    backlog = _RequestIntake.BACKLOG_STEPS * MAX_NUM_BATCHED_TOKENS
    # Before the first step: the backlog's worth (plus the prompt that crosses it), not 40.
    assert queued_before_step[0] == backlog // PROMPT_LEN + 1
    # Later, decode tokens count as consumed, so the engine may hold a few more waiting
    # (the estimate errs towards queuing more), still far from all of them at once.
    assert max(queued_before_step) < 40 // 4
    assert_no_block_leak(llm)


def test_outputs_equal_queuing_everything_at_once(model_dir: Path) -> None:
    prompts = _prompts(30)
    progressive = _llm(model_dir).generate(prompts, _greedy(6))
    # Different priorities make the intake queue every request before the first step.
    at_once = _llm(model_dir).generate(prompts, _greedy(6), priority=[0] * 29 + [1])
    assert [o.outputs[0].token_ids for o in progressive] == [
        o.outputs[0].token_ids for o in at_once
    ]


def test_a_bad_prompt_late_in_the_list_fails_the_call_and_leaks_nothing(model_dir: Path) -> None:
    llm = _llm(model_dir)
    prompts = [*_prompts(30), {"prompt_token_ids": [10**9]}]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate(prompts, _greedy())
    assert_no_block_leak(llm)
    # The engine goes on serving.
    assert len(llm.generate(_prompts(2), _greedy())[1].outputs[0].token_ids) == 4
