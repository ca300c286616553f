"""AsyncLLM when the engine fails: on one request (that stream errors, the others go on) or
for good (every stream errors, later requests too, and the death callbacks run)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvplane import AsyncLLM, EngineConfig, SamplingParams
from kvplane.engine.async_llm import EngineDeadError, RequestFailedError

GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, detokenize=False)
#: Bounds every wait: a test that reaches it has hung.
TIMEOUT = 120.0


def start(model_dir: Path) -> AsyncLLM:
    config = EngineConfig(
        model=str(model_dir),
        device="cpu",
        dtype="float32",
        skip_tokenizer_init=True,
        kv_cache_memory_bytes=4 * 2**20,
        engine_process=False,  # the tests reach into the engine
    )
    return AsyncLLM.from_config(config)


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> Iterator[AsyncLLM]:
    llm = start(model_dir)
    yield llm
    llm.shutdown()


async def tokens(
    engine: AsyncLLM, prompt: list[int], params: SamplingParams, rid: str
) -> list[int]:
    final = None
    async for output in engine.generate({"prompt_token_ids": prompt}, params, rid):
        final = output
    assert final is not None and final.finished
    return list(final.outputs[0].token_ids)


def run(coroutine: Any) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coroutine, TIMEOUT)

    return asyncio.run(bounded())


def overflowing_top_k() -> SamplingParams:
    """top_k past int64: the sampler fails building its tensor. Set after construction, so
    the engine sees it even if request validation learns to refuse it."""
    params = SamplingParams(temperature=1.0, max_tokens=4, detokenize=False)
    params.top_k = 2**63
    return params


def test_top_k_overflow_fails_only_its_request(engine: AsyncLLM) -> None:
    expected = run(tokens(engine, [1, 2, 3, 4], GREEDY, "alone"))

    async def together() -> tuple[list[int], BaseException | None]:
        stream = asyncio.create_task(tokens(engine, [1, 2, 3, 4], GREEDY, "stream"))
        await asyncio.sleep(0.05)  # let the stream start
        bad = await asyncio.gather(
            tokens(engine, [5, 6], overflowing_top_k(), "bad"), return_exceptions=True
        )
        return await stream, bad[0]

    stream_tokens, error = run(together())
    assert isinstance(error, RequestFailedError)
    assert "Overflow" in str(error)
    assert stream_tokens == expected
    assert engine.is_running
    assert run(tokens(engine, [1, 2, 3, 4], GREEDY, "after")) == expected
    block_manager = engine.engine.scheduler.block_manager
    assert block_manager.num_free_blocks == block_manager.num_blocks


def test_an_engine_that_cannot_go_on_ends_every_stream(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    llm = start(model_dir)
    died = threading.Event()
    errors: list[BaseException] = []

    def on_death(error: BaseException) -> None:
        errors.append(error)
        died.set()

    llm.on_death(on_death)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("device lost")

    monkeypatch.setattr(llm.engine.runner, "launch", broken)
    try:

        async def three() -> list[Any]:
            return await asyncio.gather(
                *(tokens(llm, [1, 2, i], GREEDY, f"r{i}") for i in range(3)),
                return_exceptions=True,
            )

        results = run(three())
        assert all(isinstance(result, EngineDeadError) for result in results), results
        assert died.wait(TIMEOUT) and len(errors) == 1
        assert "canary" in str(errors[0])
        assert not llm.is_running
        # Later requests get the error too, at once or from the stopped thread.
        with pytest.raises(EngineDeadError):
            run(tokens(llm, [1, 2], GREEDY, "later"))
        late: list[BaseException] = []
        llm.on_death(late.append)
        assert late == errors
    finally:
        llm.shutdown()
