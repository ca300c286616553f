"""Output kinds: DELTA outputs add up to the CUMULATIVE ones, step by step; FINAL_ONLY
gives the last of them alone. Stop strings (text held back, then cut), logprobs, prompt
logprobs, ``n=2`` and a sequence that ends early are all in the batch."""

from __future__ import annotations

import dataclasses

from kvplane import LLM, SamplingParams
from kvplane.engine.outputs import RequestOutput, accumulate
from kvplane.sampling.params import RequestOutputKind

from .conftest import PROMPTS, assert_no_block_leak

PARAMS = [
    SamplingParams(temperature=0.0, max_tokens=24, stop=[" the", "\n\n"]),
    SamplingParams(temperature=0.8, seed=5, n=2, max_tokens=20, logprobs=2, prompt_logprobs=1),
    SamplingParams(temperature=0.0, max_tokens=30, stop=["ing"], include_stop_str_in_output=True),
    SamplingParams(temperature=0.0, max_tokens=3),
]


def run_steps(llm: LLM, kind: RequestOutputKind) -> list[list[RequestOutput]]:
    """Every step's outputs for the requests of ``PARAMS``, all of ``kind``."""
    engine = llm.engine
    for index, params in enumerate(PARAMS):
        params = dataclasses.replace(params, output_kind=kind)
        engine.add_request(f"r{index}", PROMPTS[index], params)
    steps = []
    while engine.has_unfinished_requests():
        steps.append(engine.step())
    assert_no_block_leak(llm)
    return steps


def test_deltas_add_up_to_the_cumulative_outputs(smollm_llm: LLM) -> None:
    cumulative_steps = run_steps(smollm_llm, RequestOutputKind.CUMULATIVE)
    delta_steps = run_steps(smollm_llm, RequestOutputKind.DELTA)
    assert len(delta_steps) == len(cumulative_steps)
    rebuilt: dict[str, RequestOutput] = {}
    num_compared = 0
    for cumulative, deltas in zip(cumulative_steps, delta_steps, strict=True):
        assert [o.request_id for o in deltas] == [o.request_id for o in cumulative]
        for expected, delta in zip(cumulative, deltas, strict=True):
            previous = rebuilt.get(delta.request_id)
            if previous is None:
                assert delta.prompt_logprobs == expected.prompt_logprobs  # sent once, whole
                empty = [
                    dataclasses.replace(c, text="", token_ids=[], logprobs=[])
                    for c in delta.outputs
                ]
                previous = dataclasses.replace(delta, outputs=empty)
            else:
                assert delta.prompt_logprobs is None
            rebuilt[delta.request_id] = accumulate(previous, delta)
            assert rebuilt[delta.request_id].outputs == expected.outputs
            num_compared += 1
    assert num_compared > 20


def test_final_only_is_the_last_cumulative_output(smollm_llm: LLM) -> None:
    cumulative_steps = run_steps(smollm_llm, RequestOutputKind.CUMULATIVE)
    final_steps = run_steps(smollm_llm, RequestOutputKind.FINAL_ONLY)
    finals = [o for step in final_steps for o in step]
    assert all(o.finished for o in finals) and len(finals) == len(PARAMS)
    expected = {o.request_id: o for step in cumulative_steps for o in step if o.finished}
    for output in finals:
        assert output.outputs == expected[output.request_id].outputs
        assert output.prompt_logprobs == expected[output.request_id].prompt_logprobs


def test_unknown_output_kind_is_an_error() -> None:
    import pytest

    with pytest.raises(ValueError):
        SamplingParams(output_kind=7)  # type: ignore[arg-type]
