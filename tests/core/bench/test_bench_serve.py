"""`kvplane bench serve` against a live kvplane server on loopback."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvplane.cli.main import main
from kvplane.testing.models import save_random_model, tiny_llama_config
from tests.core.server.conftest import ServerProcess

pytestmark = pytest.mark.slow

LATENCY_FIELDS = [
    f"{stat}_{name}_ms"
    for name in ("ttft", "tpot", "itl", "e2el")
    for stat in ("mean", "median", "p99")
]


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Path]]:
    directory = tmp_path_factory.mktemp("tiny")
    save_random_model(tiny_llama_config(max_position_embeddings=1024), directory)
    process = ServerProcess(
        [
            "--model",
            str(directory),
            "--served-model-name",
            "tiny",
            "--device",
            "cpu",
            "--skip-tokenizer-init",
            "--kv-cache-memory-bytes",
            str(8 * 2**20),
            "--uvicorn-log-level",
            "warning",
        ],
        {},
        tmp_path_factory.mktemp("log") / "server.log",
    )
    try:
        process.wait_ready()
        yield process, directory
    finally:
        process.stop()


@pytest.mark.parametrize("rate", ["inf", "50"])
def test_serve_json_counts_and_rates(
    tiny_server: tuple[ServerProcess, Path], tmp_path: Path, rate: str
) -> None:
    server, directory = tiny_server
    output, plot = tmp_path / "serve.json", tmp_path / "serve.png"
    status = main(
        [
            "bench",
            "serve",
            "--base-url",
            server.url,
            "--model",
            str(directory),
            "--served-model-name",
            "tiny",
            "--input-len",
            "24",
            "--output-len",
            "10",
            "--num-prompts",
            "16",
            "--request-rate",
            rate,
            "--max-concurrency",
            "8",
            "--output-json",
            str(output),
            "--plot",
            str(plot),
        ]
    )
    assert status == 0
    result = json.loads(output.read_text())
    assert result["completed"] == 16 and result["failed"] == 0
    assert result["total_output_tokens"] == 16 * 10
    assert result["total_input_tokens"] == 16 * 24
    duration = result["duration"]
    assert result["request_throughput"] == pytest.approx(16 / duration)
    assert result["output_throughput"] == pytest.approx(160 / duration)
    assert result["total_token_throughput"] == pytest.approx((160 + 16 * 24) / duration)
    for field in LATENCY_FIELDS:
        assert result[field] >= 0.0
    assert result["mean_ttft_ms"] <= result["mean_e2el_ms"]
    assert plot.stat().st_size > 10_000


def test_streamed_tokens_follow_the_chunks_not_the_finishes() -> None:
    from kvplane.bench.serve import StreamResult, streamed_tokens

    first = StreamResult(success=True, output_tokens=4, start=10.0, chunk_times=[0.5, 1, 2, 3])
    # Two chunks for 4 tokens (text held back once): 2 tokens each.
    second = StreamResult(success=True, output_tokens=4, start=11.0, chunk_times=[0.25, 4])
    points = streamed_tokens([first, second])
    assert points == [(0.5, 1), (1, 2), (1.25, 4), (2, 5), (3, 6), (5, 8)]
    assert streamed_tokens([]) == []
