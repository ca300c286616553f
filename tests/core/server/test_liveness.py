"""Liveness: ``/health`` answers fast while the server refuses a 15 MB prompt, tokenizes
a long one, and serves 200 streams.

A real ``kvplane serve`` on loopback: a tiny random Llama with the embedded SmolLM2's
tokenizer (so text prompts are tokenized for real) and a context of 32768 tokens, with the
default body limit of 16 MiB. ``/health`` is polled from a separate process, so the
test's own clients do not delay the probes.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2
import openai
import pytest

from kvplane.testing.models import save_random_model, tiny_llama_config
from tests.core.server.conftest import ServerProcess

pytestmark = [pytest.mark.slow, pytest.mark.serial]

MODEL = "tiny"
MAX_MODEL_LEN = 32768
#: The bound on every /health answer while a prompt is refused or tokenized. The goal
#: is 100 ms; this leaves room for a shared CI machine, and is still far below the stall
#: it guards against (15 s and more before tokenizing moved off the loop).
HEALTH_BOUND_S = 0.25
#: Under 200 streams the loop shares the GIL with the engine thread, whose Python work
#: delays every socket write of the loop (by up to the 5 ms switch interval): the slowest
#: answers then depend on the machine's load. Bounds: 99% within HEALTH_BOUND_S, every
#: one within a liveness probe's default timeout (Kubernetes: 1 s).
PROBE_TIMEOUT_S = 1.0
SENTENCE = "The quick brown fox jumps over the lazy dog. "

# Polls /health every 20 ms (printing "ready" after the first answer) until a line
# arrives on stdin, then prints the (start time, latency) of every probe as JSON.
_PROBE = """
import json, select, sys, time
import httpx2
probes = []
with httpx2.Client(base_url=sys.argv[1], timeout=30) as client:
    while not probes or not select.select([sys.stdin], [], [], 0.02)[0]:
        start = time.time()
        assert client.get("/health").status_code == 200
        probes.append((start, time.time() - start))
        if len(probes) == 1:
            print("ready", flush=True)
print(json.dumps(probes))
"""


class HealthProbe:
    """``/health`` polled from another process while the ``with`` block runs."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.probes: list[tuple[float, float]] = []

    def __enter__(self) -> HealthProbe:
        self._process = subprocess.Popen(
            [sys.executable, "-c", _PROBE, self.url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._process.stdout is not None
        assert self._process.stdout.readline() == "ready\n"  # polling before the work begins
        return self

    def __exit__(self, *exc_info: object) -> None:
        time.sleep(0.2)
        output, _ = self._process.communicate("stop\n", timeout=60)
        assert self._process.returncode == 0
        self.probes = [tuple(probe) for probe in json.loads(output)]

    def latencies_between(self, start: float, end: float) -> list[float]:
        """Latencies of the probes that overlapped ``[start, end]`` (``time.time()``)."""
        return [
            latency for begun, latency in self.probes if begun < end and begun + latency > start
        ]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    from kvplane.models.config import load_tokenizer
    from kvplane.models.source import resolve_model

    directory = tmp_path_factory.mktemp("liveness")
    model = directory / "model"
    config = tiny_llama_config(vocab_size=49152, max_position_embeddings=MAX_MODEL_LEN)
    save_random_model(config, model)
    load_tokenizer(resolve_model(None)).save_pretrained(str(model))
    args = [str(model), "--device", "cpu", "--served-model-name", MODEL, "--max-num-seqs", "256"]
    args += ["--kv-cache-memory-bytes", str(32 * 2**20), "--uvicorn-log-level", "warning"]
    process = ServerProcess([*args, "--no-access-log"], {}, directory / "server.log")
    try:
        process.wait_ready()
        yield process
    finally:
        status = process.stop()
    assert status == 0, process.log_text()[-3000:]


def timed_post(url: str, path: str, body: dict) -> tuple[httpx2.Response, float, float]:
    start = time.time()
    response = httpx2.post(url + path, json=body, timeout=300)
    return response, start, time.time()


def assert_live(
    probe: HealthProbe, start: float, end: float, min_probes: int, max_s: float = HEALTH_BOUND_S
) -> list[float]:
    """At least ``min_probes`` probes overlapped ``[start, end]``, 99% of them answered
    within HEALTH_BOUND_S and all within ``max_s``."""
    latencies = sorted(probe.latencies_between(start, end))
    assert len(latencies) >= min_probes, (len(latencies), end - start)
    p99 = latencies[int(0.99 * (len(latencies) - 1))]
    print(  # shown with -s: the numbers behind the bounds
        f"\n{end - start:.2f} s; /health: {len(latencies)} probes, median "
        f"{latencies[len(latencies) // 2] * 1e3:.0f} ms, p99 {p99 * 1e3:.0f} ms, "
        f"max {latencies[-1] * 1e3:.0f} ms"
    )
    assert p99 < HEALTH_BOUND_S and latencies[-1] < max_s, latencies[-5:]
    return latencies


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions", "/tokenize"])
def test_a_15_mb_prompt_is_refused_at_once(server: ServerProcess, endpoint: str) -> None:
    text = (SENTENCE * 340_000)[:15_000_000]  # under the 16 MiB body limit
    if endpoint == "/v1/chat/completions":
        body: dict = {"model": MODEL, "messages": [{"role": "user", "content": text}]}
    else:
        body = {"model": MODEL, "prompt": text}
    with HealthProbe(server.url) as probe:
        response, start, end = timed_post(server.url, endpoint, body)
    assert response.status_code == 400, response.text[:300]
    error = response.json()["error"]
    assert error["message"].startswith(
        f"This model's maximum context length is {MAX_MODEL_LEN} tokens, but the prompt has at "
        "least "
    )
    # Refused before tokenizing it (tokenizing takes 15 to 30 s).
    assert end - start < 5.0
    assert_live(probe, start, end, min_probes=1)


def test_a_prompt_over_the_context_is_tokenized_off_the_loop(server: ServerProcess) -> None:
    text = (SENTENCE * 60_000)[:2_600_000]  # within the bound (2,654,127 characters)
    with HealthProbe(server.url) as probe:
        response, start, end = timed_post(
            server.url, "/v1/completions", {"model": MODEL, "prompt": text}
        )
    assert response.status_code == 400, response.text[:300]
    message = response.json()["error"]["message"]
    counted = re.search(r"but the prompt has (\d+) tokens \(at least one", message)
    assert counted is not None and int(counted.group(1)) > 100_000, message
    # Tokenizing takes seconds: many probes ran meanwhile, all answered fast.
    assert_live(probe, start, end, min_probes=5)


def test_health_while_serving_200_streams(server: ServerProcess) -> None:
    num_streams, num_tokens = 200, 48

    async def one(client: openai.AsyncOpenAI, index: int) -> int:
        stream = await client.completions.create(
            model=MODEL,
            prompt=f"Count to {index}:",
            max_tokens=num_tokens,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        completion_tokens = 0
        async for chunk in stream:
            if chunk.usage is not None:
                completion_tokens = chunk.usage.completion_tokens
        return completion_tokens

    async def run() -> list[int]:
        client = openai.AsyncOpenAI(
            base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=300
        )
        try:
            return list(await asyncio.gather(*(one(client, i) for i in range(num_streams))))
        finally:
            await client.close()

    with HealthProbe(server.url) as probe:
        start = time.time()
        counts = asyncio.run(run())
        end = time.time()
    assert counts == [num_tokens] * num_streams
    assert_live(probe, start, end, min_probes=10, max_s=PROBE_TIMEOUT_S)


def test_probe_catches_a_stalled_loop(tmp_path: Path) -> None:
    """The probe itself: a server whose loop stalls fails :func:`assert_live`."""
    script = tmp_path / "stalling.py"
    script.write_text(
        "import http.server, time\n"
        "class Handler(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        time.sleep(0.4)\n"
        "        self.send_response(200); self.end_headers()\n"
        "    def log_message(self, *args): pass\n"
        "server = http.server.HTTPServer(('127.0.0.1', 0), Handler)\n"
        "print(server.server_port, flush=True)\n"
        "server.serve_forever()\n"
    )
    stalling = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert stalling.stdout is not None
        url = f"http://127.0.0.1:{stalling.stdout.readline().strip()}"
        with HealthProbe(url) as probe:
            start = time.time()
            time.sleep(1.0)
            end = time.time()
        with pytest.raises(AssertionError):
            assert_live(probe, start, end, min_probes=1)
    finally:
        stalling.kill()
        stalling.wait()
