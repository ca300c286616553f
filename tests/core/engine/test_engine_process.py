"""The engine in its own process: outputs as deltas rebuild the same streams as the
in-process engine, a failing request fails alone, and a dead process ends every stream."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvplane.config import EngineConfig
from kvplane.engine.async_llm import AsyncLLM, EngineDeadError, RequestFailedError
from kvplane.engine.outputs import RequestOutput
from kvplane.sampling.params import SamplingParams

TIMEOUT = 60.0


def config(model_dir: Path, engine_process: bool) -> EngineConfig:
    return EngineConfig(
        model=str(model_dir),
        device="cpu",
        dtype="float32",
        skip_tokenizer_init=True,
        kv_cache_memory_bytes=4 * 2**20,
        engine_process=engine_process,
    )


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> Iterator[AsyncLLM]:
    llm = AsyncLLM.from_config(config(model_dir, engine_process=True))
    yield llm
    llm.shutdown()


def run(coroutine: Any) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coroutine, TIMEOUT)

    return asyncio.run(bounded())


async def stream(llm: AsyncLLM, prompt: list[int], params: SamplingParams, rid: str) -> list[Any]:
    return [output async for output in llm.generate({"prompt_token_ids": prompt}, params, rid)]


def summary(output: RequestOutput) -> list[Any]:
    return [
        (
            c.token_ids,
            c.finish_reason,
            None if c.cumulative_logprob is None else round(c.cumulative_logprob, 3),
            [{t: round(lp.logprob, 3) for t, lp in entry.items()} for entry in c.logprobs or []],
        )
        for c in output.outputs
    ]


def test_streams_match_the_in_process_engine(engine: AsyncLLM, model_dir: Path) -> None:
    """n > 1, logprobs, seeded sampling, a stop token: cumulative outputs rebuilt from the
    deltas equal the in-process engine's, step for step."""
    cases = [
        ([1, 2, 3], SamplingParams(temperature=0.0, max_tokens=9, logprobs=2, detokenize=False)),
        ([4, 5], SamplingParams(temperature=1.0, seed=7, n=3, max_tokens=7, detokenize=False)),
        ([6, 7, 8, 9], SamplingParams(temperature=0.0, max_tokens=12, detokenize=False)),
    ]

    async def all_of(llm: AsyncLLM) -> list[list[Any]]:
        streams = [stream(llm, p, params, f"r{i}") for i, (p, params) in enumerate(cases)]
        return await asyncio.gather(*streams)

    in_thread = AsyncLLM.from_config(config(model_dir, engine_process=False))
    try:
        expected = run(all_of(in_thread))
    finally:
        in_thread.shutdown()
    got = run(all_of(engine))
    assert [summary(s[-1]) for s in got] == [summary(s[-1]) for s in expected]
    for outputs in got:
        assert outputs[-1].finished and not any(o.finished for o in outputs[:-1])
        lengths = [len(o.outputs[0].token_ids) for o in outputs]
        assert lengths == sorted(lengths)  # cumulative, never shrinking
    first, last = got[0][0], got[0][-1]
    assert first.outputs[0].token_ids is not last.outputs[0].token_ids  # no shared lists
    for (prompt, _), outputs in zip(cases, got, strict=True):  # the prompt crosses once
        assert all(output.prompt_token_ids == prompt for output in outputs)


def test_a_failing_request_fails_alone(engine: AsyncLLM) -> None:
    greedy = SamplingParams(temperature=0.0, max_tokens=6, detokenize=False)
    broken = SamplingParams(temperature=1.0, max_tokens=4, detokenize=False)
    broken.top_k = 2**63  # past int64: the sampler fails building its tensor

    async def together() -> list[Any]:
        return await asyncio.gather(
            stream(engine, [1, 2, 3], greedy, "good"),
            stream(engine, [5, 6], broken, "bad"),
            return_exceptions=True,
        )

    good, bad = run(together())
    assert isinstance(bad, RequestFailedError) and "Overflow" in str(bad)
    assert len(good[-1].outputs[0].token_ids) == 6
    assert engine.is_running


def test_leaving_a_stream_frees_its_blocks_in_the_engine(engine: AsyncLLM) -> None:
    long = SamplingParams(temperature=0.0, max_tokens=300, ignore_eos=True, detokenize=False)

    async def leave_after_three() -> None:
        seen = 0
        async for _ in engine.generate({"prompt_token_ids": [1, 2]}, long, "leaves"):
            seen += 1
            if seen == 3:
                return

    async def settled() -> None:
        while (stats := engine.stats()).num_running or stats.kv_cache_usage:
            await asyncio.sleep(0.01)

    run(leave_after_three())
    run(settled())


def test_start_failure_raises_the_engine_error(tmp_path: Path) -> None:
    with pytest.raises((FileNotFoundError, ValueError), match="nowhere"):
        AsyncLLM.from_config(
            EngineConfig(model=str(tmp_path / "nowhere"), device="cpu", engine_process=True)
        )


def test_a_killed_engine_process_ends_every_stream(model_dir: Path) -> None:
    llm = AsyncLLM.from_config(config(model_dir, engine_process=True))
    died = threading.Event()
    errors: list[BaseException] = []
    llm.on_death(lambda error: (errors.append(error), died.set()))
    long = SamplingParams(temperature=0.0, max_tokens=500, ignore_eos=True, detokenize=False)
    try:

        async def killed_midway() -> list[Any]:
            streams = [asyncio.ensure_future(stream(llm, [1, i], long, f"k{i}")) for i in range(3)]
            await asyncio.sleep(0.5)
            os.kill(llm.client.process.pid, signal.SIGKILL)  # type: ignore[attr-defined]
            return await asyncio.gather(*streams, return_exceptions=True)

        results = run(killed_midway())
        assert all(isinstance(r, EngineDeadError) for r in results), results
        assert died.wait(TIMEOUT) and "status -9" in str(errors[0])
        assert not llm.is_running
        with pytest.raises(EngineDeadError):
            run(stream(llm, [1, 2], long, "later"))
    finally:
        llm.shutdown()


def test_shutdown_stops_the_process(model_dir: Path) -> None:
    llm = AsyncLLM.from_config(config(model_dir, engine_process=True))
    process = llm.client.process  # type: ignore[attr-defined]
    llm.shutdown()
    assert process.exitcode == 0
    assert not llm.is_running
