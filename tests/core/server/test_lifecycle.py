"""The waiting-queue limit (503) and SIGTERM (drain, abort after the grace period, exit 0).

A second server, cheap to start: SmolLM2's architecture with random weights and no
tokenizer (token-id prompts), two seats, one waiting place, a 6-second grace period (set
through the environment).
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator

import httpx2
import openai
import pytest

from tests.core.server.conftest import ServerProcess, async_client, metrics, wait_for_metrics

pytestmark = pytest.mark.slow

GRACE_SECONDS = 10.0
ARGS = [
    "--device",
    "cpu",
    "--load-format",
    "dummy",
    "--skip-tokenizer-init",
    "--max-model-len",
    "1024",
    "--kv-cache-memory-bytes",
    str(96 * 2**20),
    "--max-num-seqs",
    "2",
    "--max-waiting-requests",
    "1",
    "--uvicorn-log-level",
    "warning",
]
ENV = {"KVPLANE_SHUTDOWN_TIMEOUT": str(GRACE_SECONDS), "KVPLANE_API_KEY": "x"}
PROMPT = [1, 2, 3, 4, 5]


@pytest.fixture(scope="module")
def small_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    process = ServerProcess(ARGS, ENV, tmp_path_factory.mktemp("small") / "server.log")
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


#: Far more tokens than any machine makes in the grace period (or before a test looks),
#: and with the prompt within the context.
ENDLESS = 1000


def _long(client: openai.AsyncOpenAI, max_tokens: int = ENDLESS) -> object:
    return client.completions.create(
        model="SmolLM2-135M-Instruct",
        prompt=PROMPT,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )


def _refuses_connections(url: str) -> bool:
    try:
        httpx2.get(url + "/health", timeout=2)
    except httpx2.TransportError:
        return True
    return False


def test_waiting_queue_limit_gives_503(small_server: ServerProcess) -> None:
    url = small_server.url

    async def run() -> tuple[int, httpx2.Headers, dict, object]:
        client = async_client(small_server)
        client.api_key = "x"
        streams = [await _long(client) for _ in range(2)]  # both seats taken
        for stream in streams:
            await stream.__anext__()
        waiting = asyncio.create_task(
            client.completions.create(model="SmolLM2-135M-Instruct", prompt=PROMPT, max_tokens=3)
        )
        await asyncio.to_thread(wait_for_metrics, url, num_requests_waiting=1)
        async with httpx2.AsyncClient(base_url=url, headers={"Authorization": "Bearer x"}) as http:
            refused = await http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 3})
        for stream in streams:
            await stream.close()  # frees the seats: the waiting request runs
        done = await asyncio.wait_for(waiting, timeout=120)
        await client.close()
        return refused.status_code, refused.headers, refused.json(), done

    status, headers, body, done = asyncio.run(run())
    assert status == 503
    assert body["error"]["code"] == "server_overloaded"
    assert headers["retry-after"] == "1"
    assert done.usage.completion_tokens == 3 and done.choices[0].text == ""  # no tokenizer
    wait_for_metrics(url, num_requests_running=0, num_requests_waiting=0, kv_cache_usage_perc=0.0)


def test_sigterm_drains_aborts_after_grace_and_exits_zero(small_server: ServerProcess) -> None:
    async def run() -> tuple[list, list, float, bool, httpx2.Response]:
        client = async_client(small_server)
        client.api_key = "x"
        headers = {"Authorization": "Bearer x"}
        kept_alive = httpx2.AsyncClient(base_url=small_server.url, headers=headers)
        short = await _long(client, max_tokens=3)  # finishes within the grace period
        endless = await _long(client)  # cannot finish in the grace period
        short_chunks = [await short.__anext__()]
        endless_chunks = [await endless.__anext__()]
        # Opened just before the signal: well within uvicorn's 5 s keep-alive on a busy box.
        assert (await kept_alive.get("/v1/models")).status_code == 200
        small_server.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        await asyncio.sleep(0.5)
        # A request on a connection opened before the signal gets the 503, not a reset.
        late = await kept_alive.get("/v1/models")
        refused = await asyncio.to_thread(_refuses_connections, small_server.url)
        short_chunks += [chunk async for chunk in short]
        endless_chunks += [chunk async for chunk in endless]
        elapsed = time.monotonic() - signalled
        await client.close()
        await kept_alive.aclose()
        return short_chunks, endless_chunks, elapsed, refused, late

    assert metrics(small_server.url)["kvplane:num_requests_running"] == 0
    short, endless, elapsed, refused, late = asyncio.run(run())
    assert refused  # new connections are refused while in-flight requests drain
    assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
    assert late.headers["connection"] == "close" and late.headers["retry-after"] == "1"
    # The short request finished normally; the long one was cut at the grace period.
    assert [c.choices[0].finish_reason for c in short if c.choices][-1] == "length"
    assert short[-1].usage.completion_tokens == 3
    # Cut at the grace period: OpenAI's "length" (the engine's "abort").
    assert [c.choices[0].finish_reason for c in endless if c.choices][-1] == "length"
    assert 1 <= endless[-1].usage.completion_tokens < ENDLESS
    assert GRACE_SECONDS - 0.5 <= elapsed <= GRACE_SECONDS + 15
    assert small_server.process.wait(timeout=30) == 0
    assert "Traceback" not in small_server.log_text()
