"""AsyncLLM: concurrent streams, early exit aborts, bad input leaves the engine alive."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from kvplane import AsyncLLM, EngineConfig, SamplingParams
from kvplane.config import BatchLimits
from kvplane.testing.models import save_random_model, tiny_llama_config

PARAMS = SamplingParams(temperature=0.0, max_tokens=12, min_tokens=12, detokenize=False)


@pytest.fixture(scope="module", params=[True, False], ids=["engine-process", "engine-thread"])
def engine(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> AsyncLLM:
    directory: Path = tmp_path_factory.mktemp("tiny")
    save_random_model(tiny_llama_config(), directory)
    llm = AsyncLLM.from_config(
        EngineConfig(
            model=str(directory),
            device="cpu",
            dtype="float32",
            skip_tokenizer_init=True,
            kv_cache_memory_bytes=4 * 2**20,
            engine_process=request.param,
        )
    )
    yield llm
    llm.shutdown()


async def collect(engine: AsyncLLM, prompt: list[int], request_id: str) -> list[int]:
    final = None
    async for output in engine.generate({"prompt_token_ids": prompt}, PARAMS, request_id):
        final = output
    assert final is not None and final.finished
    return list(final.outputs[0].token_ids)


def test_config_has_the_engines_batch_limits(engine: AsyncLLM) -> None:
    # Filled in where the engine starts (the child process) and sent back with Ready.
    assert engine.config.batch_limits() == BatchLimits(256, 8192)


def test_concurrent_streams_match_sequential(engine: AsyncLLM) -> None:
    prompts = [[(7 * i + j) % 256 for j in range(5 + 3 * i)] for i in range(8)]

    async def run_all() -> list[list[int]]:
        return await asyncio.gather(
            *(collect(engine, prompt, f"c{i}") for i, prompt in enumerate(prompts))
        )

    together = asyncio.run(run_all())
    alone = [asyncio.run(collect(engine, prompt, f"s{i}")) for i, prompt in enumerate(prompts)]
    assert together == alone
    assert all(len(tokens) == 12 for tokens in together)


def test_leaving_a_stream_early_aborts_and_frees_blocks(engine: AsyncLLM) -> None:
    long_params = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True, detokenize=False)

    async def cut_after_two() -> int:
        seen = 0
        async for _ in engine.generate({"prompt_token_ids": [1, 2, 3]}, long_params, "cut"):
            seen += 1
            if seen == 2:
                break
        return seen

    assert asyncio.run(cut_after_two()) == 2
    deadline = time.monotonic() + 10
    while (stats := engine.stats()).kv_cache_usage != 0.0 or stats.num_running != 0:
        assert time.monotonic() < deadline, f"the aborted request still holds blocks: {stats}"
        time.sleep(0.01)


def test_bad_prompt_raises_and_engine_keeps_serving(engine: AsyncLLM) -> None:
    async def bad() -> None:
        async for _ in engine.generate({"prompt_token_ids": [10**6]}, PARAMS, "bad"):
            pass

    with pytest.raises(ValueError, match="vocabulary"):
        asyncio.run(bad())
    assert engine.is_running
    assert len(asyncio.run(collect(engine, [5, 6, 7], "after-bad"))) == 12
