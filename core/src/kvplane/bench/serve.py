"""Serving benchmark: streaming ``/v1/completions`` against any OpenAI-compatible server.

Requests arrive all at once (``--request-rate inf``) or as a Poisson process, optionally
capped at ``--max-concurrency`` in flight. Each stream's chunk times give TTFT (first
token), ITL (every gap between chunks), TPOT ((latency - TTFT) / (tokens - 1)) and the
end-to-end latency.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from kvplane.bench.datasets import BenchRequest
from kvplane.bench.results import summarize
from kvplane.bench.sse_client import Endpoint, post_events


@dataclass(slots=True)
class StreamResult:
    """What one request measured."""

    success: bool = False
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    start: float = 0.0
    itl: list[float] = field(default_factory=list)
    #: When each chunk with text arrived, in seconds from ``start``.
    chunk_times: list[float] = field(default_factory=list)
    error: str = ""


async def _stream_one(
    endpoint: Endpoint, model: str, request: BenchRequest, api_key: str | None
) -> StreamResult:
    payload = {
        "model": model,
        "prompt": request.prompt_token_ids,
        "max_tokens": request.output_len,
        "temperature": 1.0,
        "top_p": 1.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    result = StreamResult(prompt_len=len(request.prompt_token_ids))
    result.start = started = time.perf_counter()
    last = started

    def on_event(data: bytes) -> None:
        nonlocal last
        if data == b"[DONE]":
            return
        chunk = json.loads(data.decode())
        if chunk.get("usage"):
            result.output_tokens = chunk["usage"]["completion_tokens"]
        if not chunk.get("choices") or not chunk["choices"][0].get("text"):
            return
        now = time.perf_counter()
        result.chunk_times.append(now - started)
        if result.ttft == 0.0:
            result.ttft = now - started
        else:
            result.itl.append(now - last)
        last = now

    try:
        response = await post_events(endpoint, json.dumps(payload).encode(), on_event, headers)
        if response.status != 200:
            result.error = f"HTTP {response.status}: {response.error_body[:200]!r}"
            return result
        result.latency = time.perf_counter() - started
        result.success = result.output_tokens > 0
    except Exception as error:  # a failed request is a result, not a crash
        result.error = repr(error)
    return result


async def _arrivals(
    requests: list[BenchRequest], request_rate: float, seed: int
) -> AsyncIterator[BenchRequest]:
    rng = random.Random(seed)
    for request in requests:
        yield request
        if request_rate != float("inf"):
            await asyncio.sleep(rng.expovariate(request_rate))


async def run_serve(
    base_url: str,
    model: str,
    requests: list[BenchRequest],
    request_rate: float,
    max_concurrency: int | None,
    seed: int,
    api_key: str | None = None,
) -> tuple[dict[str, Any], list[StreamResult]]:
    """Run the workload against ``base_url``; returns (metrics, per-request results)."""
    from tqdm import tqdm

    endpoint = Endpoint.from_url(
        base_url.rstrip("/")
        + ("/completions" if base_url.rstrip("/").endswith("/v1") else "/v1/completions")
    )
    limit = asyncio.Semaphore(max_concurrency or len(requests))
    progress = tqdm(total=len(requests), desc="requests", unit="req")

    async def limited(request: BenchRequest) -> StreamResult:
        async with limit:
            result = await _stream_one(endpoint, model, request, api_key)
        progress.update(1)
        return result

    started = time.perf_counter()
    tasks = [asyncio.create_task(limited(r)) async for r in _arrivals(requests, request_rate, seed)]
    results = list(await asyncio.gather(*tasks))
    duration = time.perf_counter() - started
    progress.close()
    return serve_metrics(results, duration), results


def serve_metrics(results: list[StreamResult], duration: float) -> dict[str, Any]:
    """vLLM's serving metrics, in milliseconds where they are times."""
    done = [r for r in results if r.success]
    total_input = sum(r.prompt_len for r in done)
    total_output = sum(r.output_tokens for r in done)
    tpots = [
        (r.latency - r.ttft) / (r.output_tokens - 1) * 1000 for r in done if r.output_tokens > 1
    ]
    metrics: dict[str, Any] = {
        "duration": duration,
        "completed": len(done),
        "failed": len(results) - len(done),
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": len(done) / duration,
        "output_throughput": total_output / duration,
        "total_token_throughput": (total_input + total_output) / duration,
    }
    metrics.update(summarize("ttft", [r.ttft * 1000 for r in done]))
    metrics.update(summarize("tpot", tpots))
    metrics.update(summarize("itl", [gap * 1000 for r in done for gap in r.itl]))
    metrics.update(summarize("e2el", [r.latency * 1000 for r in done]))
    errors = [r.error for r in results if r.error]
    if errors:
        metrics["errors"] = errors[:10]
    return metrics


def plot_serve(results: list[StreamResult], metrics: dict[str, Any], path: str) -> None:
    """Latency distributions (TTFT, TPOT, ITL, E2EL) and output throughput over time."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ValueError("--plot needs matplotlib: pip install matplotlib") from error
    done = [r for r in results if r.success]
    figure, axes = plt.subplots(2, 3, figsize=(15, 8))
    series = {
        "TTFT (ms)": [r.ttft * 1000 for r in done],
        "TPOT (ms)": [
            (r.latency - r.ttft) / (r.output_tokens - 1) * 1000 for r in done if r.output_tokens > 1
        ],
        "ITL (ms)": [gap * 1000 for r in done for gap in r.itl],
        "E2E latency (ms)": [r.latency * 1000 for r in done],
    }
    for axis, (title, values) in zip(axes.flat, series.items(), strict=False):
        axis.hist(values, bins=40, color="#3b6ea5")
        axis.set_title(title)
        axis.set_ylabel("requests" if "ITL" not in title else "gaps")
    axis = axes.flat[4]
    points = streamed_tokens(done)
    if points:
        axis.plot([p[0] for p in points], [p[1] for p in points], color="#a53b3b")
    axis.set_title(f"output tokens streamed (throughput {metrics['output_throughput']:.0f} tok/s)")
    axis.set_xlabel("seconds")
    axes.flat[5].axis("off")
    axes.flat[5].text(
        0.0,
        0.5,
        "\n".join(
            f"{key}: {value:,.2f}"
            for key, value in metrics.items()
            if isinstance(value, float) and key.startswith(("mean", "p99", "request", "output"))
        ),
        family="monospace",
        fontsize=9,
        va="center",
    )
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def streamed_tokens(results: list[StreamResult]) -> list[tuple[float, float]]:
    """``(seconds since the first request started, output tokens received so far)`` at
    each chunk's arrival; a request's tokens (its usage) are spread over its chunks, since
    a chunk may hold several tokens when text was held back."""
    origin = min((r.start for r in results), default=0.0)
    arrivals = sorted(
        (r.start - origin + offset, r.output_tokens / len(r.chunk_times))
        for r in results
        if r.chunk_times
        for offset in r.chunk_times
    )
    points, tokens = [], 0.0
    for seconds, count in arrivals:
        tokens += count
        points.append((seconds, tokens))
    return points
