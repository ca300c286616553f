"""The server when the engine fails: on one request (500 for it, the others unaffected) or
for good (the process exits with status 1 so that a supervisor restarts it).

Faults are injected into ``kvplane serve`` subprocesses by a ``sitecustomize`` module on
their ``PYTHONPATH`` that wraps ``ModelRunner.launch``; the product has no fault hook.
The model is a tiny random Llama (token-id prompts, no tokenizer).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest

from kvplane.testing.models import save_random_model, tiny_llama_config
from tests.core.server.conftest import ServerProcess

pytestmark = pytest.mark.slow

#: A request whose prompt starts with FAILS_AT_ONCE fails in every step it is in; one
#: starting with FAILS_LATER once it has three output tokens. Mode "always": every step.
FAILS_AT_ONCE = 201
FAILS_LATER = 202
SITECUSTOMIZE = f"""
import os
import signal

from kvplane.engine.model_runner import ModelRunner

_launch = ModelRunner.launch
_ALWAYS = os.environ["KVPLANE_TEST_FAULT"] == "always"


def _fails(output):
    for scheduled in output.scheduled:
        request = scheduled.request
        first = request.prompt_token_ids[0]
        if first == {FAILS_AT_ONCE} or (first == {FAILS_LATER} and request.num_output_tokens >= 3):
            return True
    return _ALWAYS


def launch(self, output, *args, **kwargs):
    if _fails(output):
        raise RuntimeError("injected fault")
    return _launch(self, output, *args, **kwargs)


ModelRunner.launch = launch
"""
TIMEOUT = 120.0


def start_server(tmp_path: Path, mode: str) -> ServerProcess:
    model = tmp_path / "model"
    save_random_model(tiny_llama_config(), model)
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    pythonpath = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    args = [str(model), "--device", "cpu", "--skip-tokenizer-init", "--served-model-name", "tiny"]
    args += ["--kv-cache-memory-bytes", str(8 * 2**20), "--uvicorn-log-level", "warning"]
    env = {"PYTHONPATH": pythonpath, "KVPLANE_TEST_FAULT": mode}
    server = ServerProcess(args, env, tmp_path / "server.log")
    server.wait_ready()
    return server


@pytest.fixture(scope="module")
def faulty_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = start_server(tmp_path_factory.mktemp("faulty"), "poison")
    try:
        yield server
    finally:
        status = server.stop()
    assert status == 0, server.log_text()[-3000:]


def completion(prompt: list[int], max_tokens: int, **extra: Any) -> dict[str, Any]:
    return {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0} | extra


async def stream_events(http: httpx2.AsyncClient, body: dict[str, Any]) -> list[dict[str, Any]]:
    """Every SSE event of a streamed completion, as JSON ([DONE] left out)."""
    events = []
    async with http.stream("POST", "/v1/completions", json=body | {"stream": True}) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line.removeprefix("data: ")))
    return events


def test_a_failing_request_gets_its_own_error(faulty_server: ServerProcess) -> None:
    long = completion([1, 2, 3], 60, ignore_eos=True)

    async def run() -> tuple[list[dict[str, Any]], httpx2.Response, list[dict[str, Any]]]:
        async with httpx2.AsyncClient(base_url=faulty_server.url, timeout=TIMEOUT) as http:
            stream = asyncio.create_task(stream_events(http, long))
            await asyncio.sleep(0.2)  # the stream is running when the failures come
            at_once, later = await asyncio.gather(
                http.post("/v1/completions", json=completion([FAILS_AT_ONCE, 5], 8)),
                stream_events(http, completion([FAILS_LATER, 5], 8, ignore_eos=True)),
            )
            return await stream, at_once, later

    events, at_once, later = asyncio.run(asyncio.wait_for(run(), TIMEOUT))

    assert at_once.status_code == 500, at_once.text
    error = at_once.json()["error"]
    assert error["code"] == "request_failed" and error["type"] == "server_error"
    assert "RuntimeError: injected fault" in error["message"]
    # The stream that failed later got its first tokens, then an error event.
    assert sum(len(e["choices"]) for e in later if "choices" in e) >= 1
    assert later[-1]["error"]["code"] == "request_failed"
    # The stream running beside them is whole.
    finishes = [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]]
    assert finishes == ["length"] and not any("error" in e for e in events)
    after = httpx2.post(faulty_server.url + "/v1/completions", json=long, timeout=TIMEOUT)
    assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 60
    assert httpx2.get(faulty_server.url + "/health", timeout=10).status_code == 200


def test_top_k_past_int64_fails_only_its_request(faulty_server: ServerProcess) -> None:
    url = faulty_server.url + "/v1/completions"
    body = completion([1, 2], 4, temperature=1.0, top_k=2**63)
    response = httpx2.post(url, json=body, timeout=TIMEOUT)
    # 400 once the API validates the range; 500 request_failed from the engine before.
    assert response.status_code in (400, 500), response.text
    assert httpx2.post(url, json=completion([1, 2], 4), timeout=TIMEOUT).status_code == 200
    assert httpx2.get(faulty_server.url + "/health", timeout=10).status_code == 200


def test_an_engine_that_cannot_go_on_exits_with_status_1(tmp_path: Path) -> None:
    server = start_server(tmp_path, "always")
    try:
        response = httpx2.post(
            server.url + "/v1/completions", json=completion([1, 2, 3], 8), timeout=TIMEOUT
        )
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "engine_dead"
        assert server.process.wait(timeout=TIMEOUT) == 1
    finally:
        server.stop()
    log = server.log_text()
    assert "the engine cannot go on" in log and "injected fault" in log


def engine_process_of(server: ServerProcess) -> int:
    """The pid of the server's engine-core process (its ``multiprocessing`` spawn child)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == server.process.pid and b"spawn_main" in cmdline:
            return int(stat.parent.name)
    raise AssertionError("the server has no engine process")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the child in /proc")
def test_a_killed_engine_process_ends_streams_and_the_server(tmp_path: Path) -> None:
    server = start_server(tmp_path, "poison")
    try:

        async def killed_midway() -> list[dict[str, Any]]:
            body = completion([1, 2, 3], 505, ignore_eos=True, stream=True)
            events: list[dict[str, Any]] = []
            async with (
                httpx2.AsyncClient(base_url=server.url, timeout=TIMEOUT) as http,
                http.stream("POST", "/v1/completions", json=body) as response,
            ):
                async for line in response.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        events.append(json.loads(line.removeprefix("data: ")))
                        if len(events) == 1:  # tokens are streaming: kill the engine
                            os.kill(engine_process_of(server), signal.SIGKILL)
            return events

        events = asyncio.run(asyncio.wait_for(killed_midway(), TIMEOUT))
        assert any("choices" in e for e in events)
        assert events[-1]["error"]["code"] == "engine_dead", events[-1]
        assert "the engine process exited (status -9)" in events[-1]["error"]["message"]
        assert server.process.wait(timeout=TIMEOUT) == 1
    finally:
        server.stop()
    assert "the engine cannot go on" in server.log_text()
