"""``/metrics``: the server's Prometheus series, exposed with ``prometheus-client``.

Names follow vLLM's (``vllm:`` becomes ``kvplane:``) so existing dashboards need only
the prefix changed. Three groups of series, all labelled ``model_name``:

* request-level (tokens, latencies, finish reasons): recorded by
  :class:`~kvplane.server.runner.RequestRun` on the event-loop thread as engine requests
  finish;
* scheduler (running, waiting, KV-cache usage, prefix cache, preemptions; speculative
  decoding's drafts and acceptance where it is on): read at scrape time from the snapshot
  the engine thread publishes after each step (:class:`SchedulerCollector`);
* HTTP (responses by method, route and status; durations; errors): recorded by
  :class:`~kvplane.server.middleware.HttpMetrics` on the event-loop thread.

Each :class:`ServerMetrics` has its own ``CollectorRegistry``: several servers in one
process (tests) keep separate series, and the process-wide default registry (process and
GC collectors) is not exposed.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator

from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from kvplane.scheduler.output import SchedulerStats
from kvplane.spec_decode.metrics import SpecDecodeStats

PREFIX = "kvplane:"

#: Content type of what :meth:`ServerMetrics.exposition` writes: ``generate_latest`` writes
#: text format 0.0.4 (prometheus-client's ``CONTENT_TYPE_LATEST`` names 1.0.0 since 0.22).
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
# From a quick probe to a long stream: a generation can run for minutes.
HTTP_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                         30.0, 60.0, 120.0, 300.0, 600.0)  # fmt: skip

#: Finish reasons counted by ``request_success_total``.
FINISH_REASONS = ("stop", "length", "abort")


class ServerMetrics:
    """Every series of one server's ``/metrics``; recorded and exposed on the event-loop
    thread. ``read_stats`` returns the scheduler's latest snapshot (any thread may call it).
    """

    def __init__(self, model_name: str, read_stats: Callable[[], SchedulerStats]) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        # Registered first so the scheduler's series lead the exposition, as they always have.
        self.registry.register(SchedulerCollector(model_name, read_stats))
        registry = self.registry
        model = ["model_name"]
        self.prompt_tokens = Counter(
            PREFIX + "prompt_tokens_total",
            "Prompt tokens of finished requests.",
            model,
            registry=registry,
        ).labels(model_name)
        self.generation_tokens = Counter(
            PREFIX + "generation_tokens_total",
            "Generated tokens of finished requests.",
            model,
            registry=registry,
        ).labels(model_name)
        success = Counter(
            PREFIX + "request_success_total",
            "Finished requests by finish reason.",
            [*model, "finished_reason"],
            registry=registry,
        )
        # Created up front so every reason is exposed (at 0) before its first request.
        self.finished = {reason: success.labels(model_name, reason) for reason in FINISH_REASONS}
        self.ttft = Histogram(
            PREFIX + "time_to_first_token_seconds",
            "Time from a request's arrival to its first generated token.",
            model,
            buckets=TTFT_BUCKETS,
            registry=registry,
        ).labels(model_name)
        self.tpot = Histogram(
            PREFIX + "time_per_output_token_seconds",
            "Mean time between output tokens after the first, per sequence.",
            model,
            buckets=TPOT_BUCKETS,
            registry=registry,
        ).labels(model_name)
        self.e2e = Histogram(
            PREFIX + "e2e_request_latency_seconds",
            "Time from a request's arrival to its last token.",
            model,
            buckets=E2E_BUCKETS,
            registry=registry,
        ).labels(model_name)
        self.http_requests = Counter(
            PREFIX + "http_requests_total",
            "HTTP responses by method, route template and status code.",
            [*model, "method", "route", "status"],
            registry=registry,
        )
        self.http_duration = Histogram(
            PREFIX + "http_request_duration_seconds",
            "Time from an HTTP request's arrival to the end of its response body.",
            [*model, "method", "route"],
            buckets=HTTP_DURATION_BUCKETS,
            registry=registry,
        )
        self.http_errors = Counter(
            PREFIX + "http_request_errors_total",
            "Failed HTTP requests: error is 4xx, 5xx, or exception (an unhandled exception).",
            [*model, "method", "route", "error"],
            registry=registry,
        )

    def record_sequence(
        self,
        num_prompt_tokens: int,
        num_output_tokens: int,
        finish_reason: str | None,
        ttft: float | None,
        latency: float,
    ) -> None:
        """Account for one finished engine request (one prompt; ``n`` sequences summed).

        ``ttft`` is None when no token was generated (aborted while waiting).
        """
        self.prompt_tokens.inc(num_prompt_tokens)
        self.generation_tokens.inc(num_output_tokens)
        reason = finish_reason if finish_reason in self.finished else "abort"
        self.finished[reason].inc()
        if ttft is None:
            return
        self.ttft.observe(ttft)
        self.e2e.observe(latency)
        if num_output_tokens > 1:
            self.tpot.observe((latency - ttft) / (num_output_tokens - 1))

    def record_http(
        self, method: str, route: str, status: int, duration: float, raised: bool
    ) -> None:
        """Account for one HTTP request; ``route`` is its template (bounded by the caller).

        ``raised``: an exception escaped the app. Such a request is an ``exception`` error,
        not a ``5xx`` one, whatever its status: the one the server's catch-all handler
        answers (500; 503 for a stopped engine), or the one the client already got (a
        response cut short).
        """
        model = self.model_name
        self.http_requests.labels(model, method, route, str(status)).inc()
        self.http_duration.labels(model, method, route).observe(duration)
        if raised:
            error = "exception"
        elif status >= 500:
            error = "5xx"
        elif status >= 400:
            error = "4xx"
        else:
            return
        self.http_errors.labels(model, method, route, error).inc()

    def exposition(self) -> bytes:
        """Every series in the Prometheus text format (:data:`CONTENT_TYPE`), the
        scheduler's read now."""
        return generate_latest(_WithoutCreatedSamples(self.registry))


class SchedulerCollector:
    """The scheduler's series, read from ``read_stats()`` on every scrape."""

    def __init__(self, model_name: str, read_stats: Callable[[], SchedulerStats]) -> None:
        self.model_name = model_name
        self.read_stats = read_stats

    def collect(self) -> Iterator[Metric]:
        stats = self.read_stats()
        gauges = [
            ("num_requests_running", "Sequences in the running batch.", stats.num_running),
            ("num_requests_waiting", "Sequences waiting to be scheduled.", stats.num_waiting),
            ("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0 to 1).",
             stats.kv_cache_usage),
            ("prefix_cache_hit_rate", "Prompt tokens found in the prefix cache / looked up.",
             stats.prefix_cache_hit_rate),
        ]  # fmt: skip
        for name, help_text, value in gauges:
            gauge = GaugeMetricFamily(PREFIX + name, help_text, labels=["model_name"])
            gauge.add_metric([self.model_name], value)
            yield gauge
        counters = [
            ("prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache.",
             stats.prefix_cache_queries),
            ("prefix_cache_hits_total", "Prompt tokens found in the prefix cache.",
             stats.prefix_cache_hits),
            ("num_preemptions_total", "Preemptions (a sequence lost its KV blocks).",
             stats.num_preemptions_total),
        ]  # fmt: skip
        for name, help_text, value in counters:
            counter = CounterMetricFamily(PREFIX + name, help_text, labels=["model_name"])
            counter.add_metric([self.model_name], value)
            yield counter
        if stats.spec_decode is not None:
            yield from spec_decode_metrics(self.model_name, stats.spec_decode)


def spec_decode_metrics(model_name: str, stats: SpecDecodeStats) -> Iterator[Metric]:
    """Speculative decoding's series, labelled with its method (vLLM's counters, and the
    two ratios a dashboard would compute from them)."""
    labels = ["model_name", "method"]
    values = [model_name, stats.method]
    counters = [
        ("spec_decode_num_drafts", "Steps of a sequence that verified draft tokens.",
         stats.num_drafts),
        ("spec_decode_num_draft_tokens", "Draft tokens verified.", stats.num_draft_tokens),
        ("spec_decode_num_accepted_tokens", "Draft tokens accepted.",
         stats.num_accepted_tokens),
    ]  # fmt: skip
    for name, help_text, value in counters:
        counter = CounterMetricFamily(PREFIX + name, help_text, labels=labels)
        counter.add_metric(values, value)
        yield counter
    per_position = CounterMetricFamily(
        PREFIX + "spec_decode_num_accepted_tokens_per_pos",
        "Draft tokens accepted, by position in the draft (0 first).",
        labels=[*labels, "position"],
    )
    for position, value in enumerate(stats.num_accepted_tokens_per_pos):
        per_position.add_metric([*values, str(position)], value)
    yield per_position
    gauges = [
        ("spec_decode_acceptance_rate", "Accepted / verified draft tokens (0 to 1).",
         stats.acceptance_rate),
        ("spec_decode_mean_accepted_length",
         "Tokens emitted per step of a sequence with drafts, its sampled one included.",
         stats.mean_accepted_length),
    ]  # fmt: skip
    for name, help_text, ratio in gauges:
        gauge = GaugeMetricFamily(PREFIX + name, help_text, labels=labels)
        gauge.add_metric(values, ratio)
        yield gauge


class _WithoutCreatedSamples:
    """``registry``'s metrics less their ``*_created`` samples.

    prometheus-client adds a ``_created`` timestamp to every counter and histogram, which
    the 0.0.4 text format can only carry as extra gauge series (``..._created``) that the
    hand-written exposition never had. The library turns them off only process-wide
    (``disable_created_metrics``), which would reach into an embedding application.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        for metric in self.registry.collect():
            created = metric.name + "_created"
            trimmed = copy.copy(metric)
            trimmed.samples = [sample for sample in metric.samples if sample.name != created]
            yield trimmed
