"""A step that raises fails only the request behind it; the engine goes on.

Faults are injected by wrapping the model runner's ``launch`` (both the step-by-step and
the overlapped path go through it): it raises for any batch the test's predicate picks,
before the step touches the device. Every test runs with overlapped steps on and off.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kvplane import LLM, SamplingParams
from kvplane.engine.fault_isolation import UnrecoverableEngineError, request_id_of
from kvplane.engine.outputs import RequestOutput
from kvplane.scheduler.output import SchedulerOutput
from tests.core.engine.conftest import assert_no_block_leak

PROMPTS = [[(11 * i + j) % 200 + 1 for j in range(4 + 3 * i)] for i in range(6)]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, detokenize=False)
#: No test needs more steps than this; a loop that reaches it is a hang.
MAX_STEPS = 2000


class InjectedFault(RuntimeError):
    pass


def make_llm(model_dir: Path, overlap: bool) -> LLM:
    llm = LLM(
        str(model_dir),
        device="cpu",
        dtype="float32",
        skip_tokenizer_init=True,
        kv_cache_memory_bytes=4 * 2**20,
        async_scheduling=overlap,
    )
    assert llm.engine._overlap is overlap
    return llm


OVERLAP = pytest.mark.parametrize("overlap", [False, True], ids=["step-by-step", "overlapped"])


@pytest.fixture(scope="module", params=[False, True], ids=["step-by-step", "overlapped"])
def llm(request: pytest.FixtureRequest, model_dir: Path) -> Iterator[LLM]:
    """An engine the tests share: each leaves it idle, with no failure being isolated."""
    engine_llm = make_llm(model_dir, request.param)
    yield engine_llm
    assert_no_block_leak(engine_llm)


def inject(
    monkeypatch: pytest.MonkeyPatch, llm: LLM, fails: Callable[[SchedulerOutput], bool]
) -> list[SchedulerOutput]:
    """Make every step ``fails`` picks raise; return the list of steps that raised."""
    runner = llm.engine.runner
    launch = runner.launch
    failed: list[SchedulerOutput] = []

    def faulty_launch(output: SchedulerOutput, *args: Any, **kwargs: Any) -> Any:
        if fails(output):
            failed.append(output)
            raise InjectedFault("injected fault")
        return launch(output, *args, **kwargs)

    monkeypatch.setattr(runner, "launch", faulty_launch)
    return failed


def contains(request_id: str) -> Callable[[SchedulerOutput], bool]:
    return lambda output: any(request_id_of(s.request) == request_id for s in output.scheduled)


def run(
    llm: LLM, requests: dict[str, tuple[list[int], SamplingParams]], join_late: str | None = None
) -> dict[str, RequestOutput]:
    """Step until every request has finished; ``join_late`` is added after three steps
    (so the others have tokens in flight when it arrives). Returns the final outputs."""
    engine = llm.engine
    finals: dict[str, RequestOutput] = {}
    for request_id, (prompt, params) in requests.items():
        if request_id != join_late:
            engine.add_request(request_id, prompt, params)
    for step in range(MAX_STEPS):
        if step == 3 and join_late is not None:
            engine.add_request(join_late, *requests[join_late])
        for output in engine.step():
            if output.finished:
                finals[output.request_id] = output
        if step >= 3 and not engine.has_unfinished_requests():
            break
    else:
        pytest.fail("the requests did not finish")
    assert set(finals) == set(requests)
    return finals


def token_ids(outputs: dict[str, RequestOutput]) -> dict[str, list[list[int]]]:
    return {rid: [list(c.token_ids) for c in out.outputs] for rid, out in outputs.items()}


def others(prefix: str) -> dict[str, tuple[list[int], SamplingParams]]:
    return {f"{prefix}{i}": (prompt, GREEDY) for i, prompt in enumerate(PROMPTS)}


def test_a_request_failing_every_step_fails_alone(
    llm: LLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = token_ids(run(llm, others("ref")))
    requests = others("ref") | {
        "bad": ([5, 6, 7], SamplingParams(n=2, max_tokens=8, detokenize=False))
    }
    failed = inject(monkeypatch, llm, contains("bad"))

    outputs = run(llm, requests, join_late="bad")

    bad = outputs.pop("bad")
    assert bad.error == "InjectedFault: injected fault"
    assert [c.finish_reason for c in bad.outputs] == ["error", "error"]
    assert token_ids(outputs) == expected
    assert all(output.error is None for output in outputs.values())
    # Once in a batch, then alone: the canary convicted it (no third try).
    assert len(failed) == 2 and len({request_id_of(s.request) for s in failed[1].scheduled}) == 1
    assert not llm.engine._isolation.is_active
    assert_no_block_leak(llm)
    assert token_ids(run(llm, others("ref"))) == expected  # and it goes on serving


def test_a_request_failing_mid_generation_keeps_its_tokens(
    llm: LLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = token_ids(run(llm, others("ref")))
    requests = others("ref") | {"late": ([9, 8, 7], GREEDY)}

    def late_fails(output: SchedulerOutput) -> bool:
        return any(
            s.request.request_id == "late" and s.request.num_output_tokens >= 4
            for s in output.scheduled
        )

    inject(monkeypatch, llm, late_fails)
    outputs = run(llm, requests)

    late = outputs.pop("late")
    assert late.error is not None and late.outputs[0].finish_reason == "error"
    assert len(late.outputs[0].token_ids) == 4  # those delivered before the fault
    assert token_ids(outputs) == expected
    assert_no_block_leak(llm)


def test_a_fault_that_passes_loses_nothing(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = token_ids(run(llm, others("ref")))
    failed = inject(monkeypatch, llm, lambda output: len(output.scheduled) > 2 and not failed)

    outputs = run(llm, others("ref"))

    assert len(failed) == 1
    assert token_ids(outputs) == expected
    assert all(output.error is None for output in outputs.values())
    assert not llm.engine._isolation.is_active
    assert_no_block_leak(llm)


def test_a_failing_output_fails_only_its_request(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = token_ids(run(llm, others("ref")))
    processor = llm.engine.output_processor
    process_token = processor.process_token

    def faulty(request: Any, token_id: int, logprobs: Any) -> Any:
        if request.request_id == "text":
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")
        return process_token(request, token_id, logprobs)

    monkeypatch.setattr(processor, "process_token", faulty)
    outputs = run(llm, others("ref") | {"text": ([3, 4], GREEDY)})

    assert outputs.pop("text").error.startswith("UnicodeDecodeError")  # type: ignore[union-attr]
    assert token_ids(outputs) == expected
    assert_no_block_leak(llm)


@OVERLAP
def test_a_fault_in_every_step_is_unrecoverable(
    model_dir: Path, overlap: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    llm = make_llm(model_dir, overlap)
    inject(monkeypatch, llm, lambda output: True)
    for request_id, request in others("dead").items():
        llm.engine.add_request(request_id, *request)
    with pytest.raises(UnrecoverableEngineError, match="canary") as raised:
        for _ in range(MAX_STEPS):
            llm.engine.step()
    assert isinstance(raised.value.__cause__, InjectedFault)


@OVERLAP
def test_batches_that_keep_failing_are_unrecoverable(
    model_dir: Path, overlap: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    llm = make_llm(model_dir, overlap)

    def batched(output: SchedulerOutput) -> bool:
        return len({request_id_of(s.request) for s in output.scheduled}) > 1

    failed = inject(monkeypatch, llm, batched)
    for request_id, request in others("batch").items():
        llm.engine.add_request(request_id, *request)
    with pytest.raises(UnrecoverableEngineError, match="no culprit"):
        for _ in range(MAX_STEPS):
            llm.engine.step()
    assert len(failed) == 3
