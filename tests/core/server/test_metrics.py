"""``/metrics``: the series the hand-written exposition had, the HTTP series, the scheduler's.

Unit tests drive :class:`ServerMetrics` and the :class:`HttpMetrics` middleware directly
(an unhandled exception cannot be provoked on the real server: test_api_errors.py
provokes one in the app); the rest ask the main server on loopback.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import MutableMapping
from typing import Any

import httpx2
import openai
import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from prometheus_client.parser import text_string_to_metric_families

from kvplane.engine.async_llm import EngineDeadError
from kvplane.scheduler.output import SchedulerStats
from kvplane.server.errors import install_error_handlers
from kvplane.server.metrics import ServerMetrics
from kvplane.server.middleware import HttpMetrics
from tests.core.server.conftest import MODEL, ServerProcess, wait_for_metrics

#: Every family of ``/metrics`` before prometheus-client, as it was served (captured from a
#: running server): name -> (type, help). None may disappear or change.
OLD_FAMILIES = {
    "kvplane:num_requests_running": ("gauge", "Sequences in the running batch."),
    "kvplane:num_requests_waiting": ("gauge", "Sequences waiting to be scheduled."),
    "kvplane:kv_cache_usage_perc": ("gauge", "Fraction of KV-cache blocks in use (0 to 1)."),
    "kvplane:prefix_cache_hit_rate": (
        "gauge",
        "Prompt tokens found in the prefix cache / looked up.",
    ),
    "kvplane:prefix_cache_queries_total": (
        "counter",
        "Prompt tokens looked up in the prefix cache.",
    ),
    "kvplane:prefix_cache_hits_total": ("counter", "Prompt tokens found in the prefix cache."),
    "kvplane:num_preemptions_total": (
        "counter",
        "Preemptions (a sequence lost its KV blocks).",
    ),
    "kvplane:prompt_tokens_total": ("counter", "Prompt tokens of finished requests."),
    "kvplane:generation_tokens_total": ("counter", "Generated tokens of finished requests."),
    "kvplane:request_success_total": ("counter", "Finished requests by finish reason."),
    "kvplane:time_to_first_token_seconds": (
        "histogram",
        "Time from a request's arrival to its first generated token.",
    ),
    "kvplane:time_per_output_token_seconds": (
        "histogram",
        "Mean time between output tokens after the first, per sequence.",
    ),
    "kvplane:e2e_request_latency_seconds": (
        "histogram",
        "Time from a request's arrival to its last token.",
    ),
}
#: Every sample name it had, with its label names.
OLD_SAMPLES = {
    "kvplane:num_requests_running": {"model_name"},
    "kvplane:num_requests_waiting": {"model_name"},
    "kvplane:kv_cache_usage_perc": {"model_name"},
    "kvplane:prefix_cache_hit_rate": {"model_name"},
    "kvplane:prefix_cache_queries_total": {"model_name"},
    "kvplane:prefix_cache_hits_total": {"model_name"},
    "kvplane:num_preemptions_total": {"model_name"},
    "kvplane:prompt_tokens_total": {"model_name"},
    "kvplane:generation_tokens_total": {"model_name"},
    "kvplane:request_success_total": {"model_name", "finished_reason"},
    "kvplane:time_to_first_token_seconds_bucket": {"model_name", "le"},
    "kvplane:time_to_first_token_seconds_sum": {"model_name"},
    "kvplane:time_to_first_token_seconds_count": {"model_name"},
    "kvplane:time_per_output_token_seconds_bucket": {"model_name", "le"},
    "kvplane:time_per_output_token_seconds_sum": {"model_name"},
    "kvplane:time_per_output_token_seconds_count": {"model_name"},
    "kvplane:e2e_request_latency_seconds_bucket": {"model_name", "le"},
    "kvplane:e2e_request_latency_seconds_sum": {"model_name"},
    "kvplane:e2e_request_latency_seconds_count": {"model_name"},
}
#: Its histogram buckets (the ``le`` values, as written).
OLD_BUCKETS = {
    "kvplane:time_to_first_token_seconds_bucket": "0.001 0.005 0.01 0.02 0.04 0.06 0.08 0.1 "
    "0.25 0.5 0.75 1.0 2.5 5.0 7.5 10.0 20.0 40.0 80.0 +Inf",
    "kvplane:time_per_output_token_seconds_bucket": "0.01 0.025 0.05 0.075 0.1 0.15 0.2 0.3 "
    "0.4 0.5 0.75 1.0 2.5 5.0 7.5 10.0 20.0 40.0 80.0 +Inf",
    "kvplane:e2e_request_latency_seconds_bucket": "0.3 0.5 0.8 1.0 1.5 2.0 2.5 5.0 10.0 15.0 "
    "20.0 30.0 40.0 50.0 60.0 120.0 240.0 480.0 960.0 1920.0 7680.0 +Inf",
}
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"
REQUESTS = "kvplane:http_requests_total"
ERRORS = "kvplane:http_request_errors_total"
DURATION = "kvplane:http_request_duration_seconds"

SampleKey = tuple[str, tuple[tuple[str, str], ...]]


def key(name: str, **labels: str) -> SampleKey:
    """A sample's identity, ``model_name`` left out."""
    return name, tuple(sorted(labels.items()))


def parse(text: str) -> dict[SampleKey, float]:
    return {
        key(sample.name, **{k: v for k, v in sample.labels.items() if k != "model_name"}): (
            sample.value
        )
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape(base_url: str) -> dict[SampleKey, float]:
    return parse(httpx2.get(base_url + "/metrics", timeout=30).text)


def wait_for_increase(
    base_url: str, before: dict[SampleKey, float], expected: dict[SampleKey, float]
) -> dict[SampleKey, float]:
    """Poll ``/metrics`` until each sample is exactly its expected amount above ``before``
    (a request is recorded once its response has been sent, just after the client reads it)."""
    deadline = time.monotonic() + 20
    while True:
        after = scrape(base_url)
        increase = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in expected}
        if increase == expected:
            return after
        if time.monotonic() > deadline:
            pytest.fail(f"increases {increase} != expected {expected}")
        time.sleep(0.1)


# -- the main server ------------------------------------------------------------------------


@pytest.mark.slow
def test_every_series_of_the_hand_written_exposition_is_kept(server: ServerProcess) -> None:
    response = httpx2.get(server.url + "/metrics")
    assert response.headers["content-type"] == PROMETHEUS_TEXT
    text = response.text
    for name, (kind, help_text) in OLD_FAMILIES.items():
        assert f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n" in text
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    for name, label_names in OLD_SAMPLES.items():
        found = [s for s in samples if s.name == name]
        assert found, name
        assert all(set(s.labels) == label_names for s in found), name
        assert all(s.labels["model_name"] == MODEL for s in found), name
    reasons = {s.labels["finished_reason"] for s in samples if s.name.endswith("success_total")}
    assert reasons == {"stop", "length", "abort"}
    for name, bounds in OLD_BUCKETS.items():
        assert [s.labels["le"] for s in samples if s.name == name] == bounds.split()
    assert "_created" not in text


@pytest.mark.slow
def test_http_requests_are_counted_by_route_template_and_status(
    server: ServerProcess, client: openai.OpenAI, http: httpx2.Client
) -> None:
    chat = "/v1/chat/completions"
    before = scrape(server.url)
    client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2
    )
    malformed = http.post(chat, content=b"{not json", headers={"content-type": "application/json"})
    assert malformed.status_code == 400
    assert httpx2.post(server.url + chat, json={}).status_code == 401  # no API key: the gate
    assert http.get(f"/v1/models/{MODEL}").status_code == 200
    assert http.get("/no/such/path").status_code == 404
    after = wait_for_increase(
        server.url,
        before,
        {
            key(REQUESTS, method="POST", route=chat, status="200"): 1,
            key(REQUESTS, method="POST", route=chat, status="400"): 1,
            key(REQUESTS, method="POST", route=chat, status="401"): 1,
            key(REQUESTS, method="GET", route="/v1/models/{model:path}", status="200"): 1,
            key(REQUESTS, method="GET", route="unmatched", status="404"): 1,
            key(ERRORS, method="POST", route=chat, error="4xx"): 2,
            key(ERRORS, method="POST", route=chat, error="5xx"): 0,
            key(ERRORS, method="POST", route=chat, error="exception"): 0,
            key(ERRORS, method="GET", route="unmatched", error="4xx"): 1,
            key(DURATION + "_count", method="POST", route=chat): 3,
            key(DURATION + "_bucket", method="POST", route=chat, le="+Inf"): 3,
        },
    )
    assert after[key(DURATION + "_sum", method="POST", route=chat)] > before.get(
        key(DURATION + "_sum", method="POST", route=chat), 0.0
    )
    routes = {dict(labels).get("route") for _, labels in after}
    assert "/no/such/path" not in routes and f"/v1/models/{MODEL}" not in routes


@pytest.mark.slow
def test_scheduler_gauges_follow_a_running_request(
    server: ServerProcess, client: openai.OpenAI
) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Count to a thousand."}],
        max_tokens=400,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    try:
        next(iter(stream))
        running = wait_for_metrics(server.url, num_requests_running=1)
        assert running["kvplane:kv_cache_usage_perc"] > 0.0
    finally:
        stream.close()  # the server aborts the request
    wait_for_metrics(server.url, num_requests_running=0, kv_cache_usage_perc=0.0)


# -- ServerMetrics and HttpMetrics alone ------------------------------------------------------


def test_exposition_counts_requests_escapes_labels_and_reads_stats_per_scrape() -> None:
    stats = [SchedulerStats(1, 2, 0.25, 10, 5, 3)]
    metrics = ServerMetrics('my "model"', lambda: stats[0])
    metrics.record_sequence(10, 4, "length", ttft=0.5, latency=2.0)
    metrics.record_sequence(0, 0, None, ttft=None, latency=1.0)
    text = metrics.exposition().decode()
    labels = 'model_name="my \\"model\\""'
    assert f"kvplane:num_requests_waiting{{{labels}}} 2.0\n" in text
    assert f"kvplane:kv_cache_usage_perc{{{labels}}} 0.25\n" in text
    assert f"kvplane:prefix_cache_hit_rate{{{labels}}} 0.5\n" in text
    assert f"kvplane:num_preemptions_total{{{labels}}} 3.0\n" in text
    assert f"kvplane:prompt_tokens_total{{{labels}}} 10.0\n" in text
    assert f'kvplane:request_success_total{{finished_reason="abort",{labels}}} 1.0\n' in text
    assert f'kvplane:request_success_total{{finished_reason="length",{labels}}} 1.0\n' in text
    assert f"kvplane:time_per_output_token_seconds_sum{{{labels}}} 0.5\n" in text
    assert f"kvplane:time_to_first_token_seconds_count{{{labels}}} 1.0\n" in text
    stats[0] = SchedulerStats(0, 7, 0.5, 10, 5, 4)
    text = metrics.exposition().decode()
    assert f"kvplane:num_requests_waiting{{{labels}}} 7.0\n" in text
    assert f"kvplane:num_preemptions_total{{{labels}}} 4.0\n" in text


def test_two_servers_in_one_process_keep_separate_series() -> None:
    idle = SchedulerStats(0, 0, 0.0, 0, 0, 0)
    first = ServerMetrics("a", lambda: idle)
    second = ServerMetrics("b", lambda: idle)
    first.record_sequence(5, 1, "stop", ttft=0.1, latency=0.1)
    assert parse(first.exposition().decode())[key("kvplane:prompt_tokens_total")] == 5
    assert parse(second.exposition().decode())[key("kvplane:prompt_tokens_total")] == 0


STREAM_PAUSE = 0.3


def _app(metrics: ServerMetrics) -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(HttpMetrics, metrics=metrics, routes=app.router.routes)

    @app.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        return {"id": item_id}

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("a bug")

    @app.get("/dead")
    async def dead() -> None:
        raise EngineDeadError("the engine thread stopped")

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def body() -> Any:
            yield b"first"
            await asyncio.sleep(STREAM_PAUSE)
            yield b"last"

        return StreamingResponse(body())

    return app


async def _call(
    app: FastAPI, method: str, path: str, sent: list[dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """The messages ``app`` sends (also appended to ``sent``) for one request without a body."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
    }
    received = False
    sent = [] if sent is None else sent

    async def receive() -> dict[str, Any]:
        nonlocal received
        if not received:
            received = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.Event().wait()  # the client never leaves
        raise AssertionError("unreachable")

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(dict(message))

    await app(scope, receive, send)
    return sent


def _sample(metrics: ServerMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, {"model_name": "m", **labels})


def test_middleware_labels_route_templates_and_bounds_methods() -> None:
    metrics = ServerMetrics("m", lambda: SchedulerStats(0, 0, 0.0, 0, 0, 0))
    app = _app(metrics)

    async def run() -> None:
        for _ in range(2):
            await _call(app, "GET", "/items/7")
        await _call(app, "POST", "/items/7")  # the route, not the method: 405
        await _call(app, "GET", "/nowhere")
        await _call(app, "BREW", "/nowhere")

    asyncio.run(run())
    items = "/items/{item_id}"
    assert _sample(metrics, REQUESTS, method="GET", route=items, status="200") == 2
    assert _sample(metrics, REQUESTS, method="POST", route=items, status="405") == 1
    assert _sample(metrics, REQUESTS, method="GET", route="unmatched", status="404") == 1
    assert _sample(metrics, REQUESTS, method="other", route="unmatched", status="404") == 1
    assert _sample(metrics, ERRORS, method="POST", route=items, error="4xx") == 1
    assert _sample(metrics, ERRORS, method="GET", route=items, error="4xx") is None
    assert _sample(metrics, DURATION + "_count", method="GET", route=items) == 2


@pytest.mark.parametrize(("path", "status"), [("/boom", "500"), ("/dead", "503")])
def test_middleware_counts_an_unhandled_exception_with_the_status_answered(
    path: str, status: str
) -> None:
    metrics = ServerMetrics("m", lambda: SchedulerStats(0, 0, 0.0, 0, 0, 0))
    # Answered inside HttpMetrics (AnswerUnhandledErrors), not re-raised: the connection
    # stays usable.
    sent = asyncio.run(_call(_app(metrics), "GET", path))
    assert str(sent[0]["status"]) == status
    assert _sample(metrics, REQUESTS, method="GET", route=path, status=status) == 1
    assert _sample(metrics, ERRORS, method="GET", route=path, error="exception") == 1
    assert _sample(metrics, ERRORS, method="GET", route=path, error="5xx") is None


def test_middleware_times_a_stream_to_the_end_of_its_body() -> None:
    metrics = ServerMetrics("m", lambda: SchedulerStats(0, 0, 0.0, 0, 0, 0))
    sent = asyncio.run(_call(_app(metrics), "GET", "/stream"))
    assert sent[0]["status"] == 200 and sent[-1].get("more_body", False) is False
    assert _sample(metrics, REQUESTS, method="GET", route="/stream", status="200") == 1
    duration = _sample(metrics, DURATION + "_sum", method="GET", route="/stream")
    assert duration is not None and duration >= STREAM_PAUSE
