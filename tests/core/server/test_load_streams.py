"""1,000 concurrent streams and 500 streams cut mid-way, on a tiny random model.

A real ``kvplane serve`` on loopback (a tiny random Llama with the embedded SmolLM2's
tokenizer, as in ``test_liveness.py``). Every stream must arrive whole and well formed,
and afterwards ``/metrics`` must show no request running and no KV block in use: a
stream lost, or a cut stream whose blocks were never freed, would show there.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import httpx2
import pytest

from kvplane.testing.models import save_random_model, tiny_llama_config
from tests.core.server.conftest import ServerProcess, metrics, wait_for_metrics

pytestmark = [pytest.mark.slow, pytest.mark.serial]

MODEL = "tiny"
#: The issue's figures: streams served at once, and streams cut after their first events.
NUM_STREAMS = 1000
NUM_CUT_STREAMS = 500
NUM_TOKENS = 8
MAX_NUM_SEQS = 256
ABORTED = "kvplane:request_success_total{finished_reason=abort}"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    from kvplane.models.config import load_tokenizer
    from kvplane.models.source import resolve_model

    directory = tmp_path_factory.mktemp("load_streams")
    model = directory / "model"
    save_random_model(tiny_llama_config(vocab_size=49152), model)
    load_tokenizer(resolve_model(None)).save_pretrained(str(model))
    args = [str(model), "--device", "cpu", "--served-model-name", MODEL]
    args += ["--max-num-seqs", str(MAX_NUM_SEQS), "--kv-cache-memory-bytes", str(32 * 2**20)]
    args += ["--uvicorn-log-level", "warning", "--no-access-log"]
    process = ServerProcess(args, {}, directory / "server.log")
    try:
        process.wait_ready()
        yield process
    finally:
        status = process.stop()
    assert status == 0, process.log_text()[-3000:]
    assert "Traceback" not in process.log_text(), process.log_text()[-3000:]


def stream_body(index: int) -> dict:
    return {
        "model": MODEL,
        "prompt": f"Stream {index}:",
        "max_tokens": NUM_TOKENS,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def pool(size: int) -> httpx2.AsyncClient:
    limits = httpx2.Limits(max_connections=size, max_keepalive_connections=size)
    return httpx2.AsyncClient(timeout=600, limits=limits)


def check_stream(lines: list[str]) -> int:
    """The completion tokens of one whole stream; raises AssertionError if malformed:
    every event a ``data:`` line of JSON, ``[DONE]`` last, exactly one finish_reason,
    usage that counts the tokens."""
    events = [line for line in lines if line]
    assert all(line.startswith("data: ") for line in events), events
    assert events[-1] == "data: [DONE]", events[-3:]
    chunks = [json.loads(line[6:]) for line in events[:-1]]
    assert not any("error" in chunk for chunk in chunks), chunks
    finishes = [c["finish_reason"] for chunk in chunks for c in chunk["choices"]]
    assert [reason for reason in finishes if reason is not None] == ["length"], finishes
    usage = chunks[-1]["usage"]
    assert usage is not None and usage["completion_tokens"] == NUM_TOKENS, chunks[-1]
    return usage["completion_tokens"]


def test_1000_concurrent_streams(server: ServerProcess) -> None:
    async def one(client: httpx2.AsyncClient, index: int) -> int:
        url = server.url + "/v1/completions"
        async with client.stream("POST", url, json=stream_body(index)) as response:
            assert response.status_code == 200, await response.aread()
            return check_stream([line async for line in response.aiter_lines()])

    async def run() -> list[int]:
        async with pool(NUM_STREAMS) as client:
            return list(await asyncio.gather(*(one(client, i) for i in range(NUM_STREAMS))))

    before = metrics(server.url)
    start = time.monotonic()
    counts = asyncio.run(run())
    print(f"\n{NUM_STREAMS} streams in {time.monotonic() - start:.1f} s")  # shown with -s
    assert counts == [NUM_TOKENS] * NUM_STREAMS  # none lost, none short
    after = wait_for_metrics(
        server.url, num_requests_running=0, num_requests_waiting=0, kv_cache_usage_perc=0.0
    )
    generated = after["kvplane:generation_tokens_total"] - before["kvplane:generation_tokens_total"]
    assert generated == NUM_STREAMS * NUM_TOKENS
    assert after.get(ABORTED, 0) == before.get(ABORTED, 0)


def test_500_streams_cut_mid_way_free_their_blocks(server: ServerProcess) -> None:
    async def cut(client: httpx2.AsyncClient, index: int) -> int:
        body = stream_body(index) | {"max_tokens": 400}  # far more than is read
        received = 0
        async with client.stream("POST", server.url + "/v1/completions", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    json.loads(line[6:])
                    received += 1
                    if received == 1 + index % 2:  # one or two events, then leave
                        break
        return received

    async def run() -> list[int]:
        async with pool(NUM_CUT_STREAMS) as client:
            return list(await asyncio.gather(*(cut(client, i) for i in range(NUM_CUT_STREAMS))))

    before = metrics(server.url)
    start = time.monotonic()
    received = asyncio.run(run())
    after = wait_for_metrics(
        server.url,
        timeout=60,
        num_requests_running=0,
        num_requests_waiting=0,
        kv_cache_usage_perc=0.0,
    )
    print(f"\n{NUM_CUT_STREAMS} cut streams freed in {time.monotonic() - start:.1f} s")
    assert received == [1 + i % 2 for i in range(NUM_CUT_STREAMS)]
    assert after[ABORTED] - before.get(ABORTED, 0) == NUM_CUT_STREAMS
    generated = after["kvplane:generation_tokens_total"] - before["kvplane:generation_tokens_total"]
    assert generated < NUM_CUT_STREAMS * 400 / 2  # cut far from their end
