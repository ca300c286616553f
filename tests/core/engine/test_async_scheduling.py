"""Overlapped steps (``async_scheduling``) give exactly the outputs of step-by-step runs.

The cpu platform runs synchronously, so nothing actually overlaps here; what is checked
is the bookkeeping: placeholder tokens, tokens read from the previous step's samples,
finishing one step late, preemption, parallel sampling, aborts and the fallback for
requests that need their tokens on the host (penalties).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kvplane import LLM, SamplingParams
from kvplane.engine.llm_engine import LLMEngine
from kvplane.scheduler.request import PLACEHOLDER_TOKEN_ID
from tests.core.engine.conftest import PROMPTS, assert_no_block_leak, make_llm


def params_mix() -> list[SamplingParams]:
    """Greedy and seeded rows, stop strings and ids, logprobs, n=2, varied lengths."""
    return [
        SamplingParams(temperature=0.0, max_tokens=12),
        SamplingParams(temperature=0.9, seed=1, max_tokens=20, logprobs=2),
        SamplingParams(temperature=0.0, max_tokens=24, stop=[","]),
        SamplingParams(temperature=0.7, seed=3, max_tokens=9, n=2),
        SamplingParams(temperature=0.0, max_tokens=30, stop_token_ids=[28, 30]),
        SamplingParams(temperature=1.0, seed=5, top_p=0.8, max_tokens=16, min_tokens=4),
        SamplingParams(temperature=0.0, max_tokens=1),
        SamplingParams(temperature=0.5, seed=7, top_k=5, max_tokens=14, logprobs=1),
    ]


class Close(float):
    """A float that compares equal to floats within 1e-4."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, float) and abs(self - other) <= 1e-4

    __hash__ = float.__hash__


def summarise(outputs: list) -> list:
    """Tokens, text and finish exactly; logprobs to 1e-4 (batches differ in size, since
    overlapped steps run a finished request one step longer: float32 sums differ)."""
    return [
        [
            (
                c.token_ids,
                c.text,
                c.finish_reason,
                c.stop_reason,
                [
                    {t: (Close(lp.logprob), lp.rank) for t, lp in entry.items()}
                    for entry in c.logprobs or []
                ],
            )
            for c in output.outputs
        ]
        for output in outputs
    ]


def run(llm: LLM, params: list[SamplingParams]) -> list:
    outputs = llm.generate(PROMPTS, params)
    assert_no_block_leak(llm)
    return summarise(outputs)


@pytest.fixture(scope="module")
def engines(smollm_llm: LLM) -> tuple[LLM, LLM]:
    """The session's engine (step by step on the cpu platform) and an overlapping one."""
    return smollm_llm, make_llm(async_scheduling=True)


def test_same_outputs_as_step_by_step(engines: tuple[LLM, LLM]) -> None:
    sync_llm, overlap_llm = engines
    assert overlap_llm.engine._overlap and not sync_llm.engine._overlap
    assert run(overlap_llm, params_mix()) == run(sync_llm, params_mix())


def test_same_outputs_under_preemption(tiny_smollm_dir: Path) -> None:
    # A tiny random-weight model with SmolLM2's tokenizer: the bookkeeping under
    # preemption does not depend on the weights, and recomputation takes many steps.
    model = str(tiny_smollm_dir)
    bytes_per_block = make_llm(model=model, max_model_len=128).engine.runner.bytes_per_block()
    # Room for 1.5 sequences of max_model_len: running requests get preempted.
    options = dict(
        model=model, max_model_len=128, kv_cache_memory_bytes=12 * bytes_per_block, max_num_seqs=8
    )
    params = [SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)] * len(PROMPTS)
    sync_llm = make_llm(async_scheduling=False, **options)
    overlap_llm = make_llm(async_scheduling=True, **options)
    expected = run(sync_llm, params)
    assert sync_llm.engine.stats().num_preemptions_total > 0
    assert run(overlap_llm, params) == expected
    assert overlap_llm.engine.stats().num_preemptions_total > 0


def test_requests_needing_host_tokens_run_step_by_step(engines: tuple[LLM, LLM]) -> None:
    sync_llm, overlap_llm = engines
    params = params_mix()
    params[2] = SamplingParams(temperature=0.0, max_tokens=20, repetition_penalty=1.3)
    params[5] = SamplingParams(temperature=0.8, seed=2, max_tokens=18, frequency_penalty=0.5)
    assert run(overlap_llm, params) == run(sync_llm, params)
    assert not overlap_llm.engine._host_token_request_ids


def start_in_flight(llm: LLM, prefix: str, num_requests: int, num_steps: int) -> LLMEngine:
    """Add ``num_requests`` long greedy requests and step until one is in flight."""
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True)
    for index, prompt in enumerate(PROMPTS[:num_requests]):
        engine.add_request(f"{prefix}-{index}", prompt, params)
    for _ in range(num_steps):
        engine.step()
    assert engine._in_flight is not None
    return engine


def test_abort_while_a_step_is_in_flight(engines: tuple[LLM, LLM]) -> None:
    _, overlap_llm = engines
    engine = start_in_flight(overlap_llm, "abort", num_requests=4, num_steps=5)
    running = [engine.scheduler.get_request(f"abort-{i}") for i in range(4)]
    assert all(r is not None and r.output_token_ids[-1] == PLACEHOLDER_TOKEN_ID for r in running)
    engine.abort_request(["abort-0", "abort-2"])
    while engine.has_unfinished_requests():
        engine.step()
    assert_no_block_leak(overlap_llm)


def test_aborting_everything_in_flight_leaves_nothing_to_wait_for(
    engines: tuple[LLM, LLM],
) -> None:
    _, overlap_llm = engines
    engine = start_in_flight(overlap_llm, "all", num_requests=3, num_steps=3)
    engine.abort_request([f"all-{i}" for i in range(3)])
    assert not engine.has_unfinished_requests()
    assert_no_block_leak(overlap_llm)
    # The engine goes on serving afterwards.
    output = overlap_llm.generate(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=4))
    assert len(output[0].outputs[0].token_ids) == 4
