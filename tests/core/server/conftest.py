"""Real ``kvplane serve`` subprocesses on loopback, and clients for them.

The main server (session-scoped: started once, shared by the API test modules) serves the
embedded SmolLM2 on the cpu platform with a small KV cache. Its API key comes from the
environment and its context length from a flag that overrides the environment, so the
settings precedence is exercised by every test.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2
import openai
import pytest

API_KEY = "test-key"
MODEL = "smol"
ALIAS = "smol-alias"
MAX_MODEL_LEN = 512
MAX_NUM_SEQS = 96
MAX_BODY_BYTES = 200_000

#: Main server: flags (the env below sets KVPLANE_MAX_MODEL_LEN=300; the flag must win).
MAIN_ARGS = [
    "--device",
    "cpu",
    "--max-model-len",
    str(MAX_MODEL_LEN),
    "--kv-cache-memory-bytes",
    str(128 * 2**20),  # ~2,900 tokens at ~46 KB per token
    "--served-model-name",
    MODEL,
    ALIAS,
    "--max-request-body-bytes",
    str(MAX_BODY_BYTES),
    "--uvicorn-log-level",
    "warning",
]
MAIN_ENV = {
    "KVPLANE_API_KEY": API_KEY,
    "KVPLANE_MAX_MODEL_LEN": "300",
    "KVPLANE_MAX_NUM_SEQS": str(MAX_NUM_SEQS),
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """``kvplane serve`` in a subprocess; output goes to ``log_path``."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.log_path = log_path
        self._log = open(log_path, "wb")
        command = [
            sys.executable,
            "-m",
            "kvplane.cli.main",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *args,
        ]
        self.process = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **env}
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"server exited with {self.process.returncode}:\n{self.log_text()}")
            try:
                if httpx2.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx2.TransportError:
                pass
            time.sleep(0.25)
        pytest.fail(f"server not ready after {timeout} s:\n{self.log_text()[-3000:]}")

    def stop(self) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("server") / "main.log"
    process = ServerProcess(MAIN_ARGS, MAIN_ENV, log)
    try:
        process.wait_ready()
        yield process
    finally:
        status = process.stop()
    assert status == 0, process.log_text()[-3000:]
    assert "Traceback" not in process.log_text(), process.log_text()[-3000:]


@pytest.fixture(scope="session")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="session")
def http(server: ServerProcess) -> Iterator[httpx2.Client]:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx2.Client(base_url=server.url, headers=headers, timeout=300) as session:
        yield session


def async_client(server: ServerProcess) -> openai.AsyncOpenAI:
    """A new async client (one per event loop: each test runs its own asyncio.run)."""
    return openai.AsyncOpenAI(
        base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=300
    )


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


def metrics(base_url: str) -> dict[str, float]:
    """``/metrics`` as ``{"name{labels}" or "name": value}``; labels other than
    ``finished_reason`` and ``le`` are dropped from the key."""
    text = httpx2.get(base_url + "/metrics", timeout=30).text
    values: dict[str, float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None:
            continue
        name, labels, value = match.groups()
        kept = re.findall(r'(finished_reason|le)="([^"]*)"', labels or "")
        key = name + ("{" + ",".join(f"{k}={v}" for k, v in kept) + "}" if kept else "")
        values[key] = float(value)
    return values


def wait_for_metrics(base_url: str, timeout: float = 20.0, **expected: float) -> dict[str, float]:
    """Poll ``/metrics`` until every ``kvplane:<name>`` equals its expected value."""
    deadline = time.monotonic() + timeout
    while True:
        values = metrics(base_url)
        if all(values.get("kvplane:" + name) == value for name, value in expected.items()):
            return values
        if time.monotonic() > deadline:
            got = {name: values.get("kvplane:" + name) for name in expected}
            pytest.fail(f"metrics did not reach {expected} in {timeout} s; last {got}")
        time.sleep(0.1)
