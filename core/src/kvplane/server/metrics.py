"""``/metrics`` in the Prometheus text format (version 0.0.4), written without a client library.

Names follow vLLM's (``vllm:`` becomes ``kvplane:``) so existing dashboards need only
the prefix changed. Request-level series (tokens, latencies, finish reasons) are recorded
by the server on the event-loop thread; scheduler series (running, waiting, KV-cache
usage, prefix cache, preemptions) are read at scrape time from the snapshot the engine
thread publishes after each step.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

from kvplane.scheduler.output import SchedulerStats

PREFIX = "kvplane:"

#: Content type of the text format.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip

#: Finish reasons counted by ``request_success_total``.
FINISH_REASONS = ("stop", "length", "abort")


class Histogram:
    """Cumulative buckets, a sum and a count (Prometheus histogram semantics)."""

    def __init__(self, name: str, help_text: str, buckets: Sequence[float]) -> None:
        self.name = name
        self.help_text = help_text
        self.bounds = tuple(sorted(buckets))
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        if not math.isfinite(value):
            return
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def render(self, labels: str) -> list[str]:
        """Text lines; ``labels`` is ``name="value",...`` added to every sample."""
        lines = [f"# HELP {self.name} {self.help_text}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for bound, count in zip(self.bounds, self.counts, strict=False):
            cumulative += count
            lines.append(f'{self.name}_bucket{{{labels},le="{_number(bound)}"}} {cumulative}')
        lines.append(f'{self.name}_bucket{{{labels},le="+Inf"}} {self.count}')
        lines.append(f"{self.name}_sum{{{labels}}} {_number(self.sum)}")
        lines.append(f"{self.name}_count{{{labels}}} {self.count}")
        return lines


class ServerMetrics:
    """Every series of ``/metrics``; mutated and rendered on the event-loop thread only."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished: dict[str, int] = dict.fromkeys(FINISH_REASONS, 0)
        self.ttft = Histogram(
            PREFIX + "time_to_first_token_seconds",
            "Time from a request's arrival to its first generated token.",
            TTFT_BUCKETS,
        )
        self.tpot = Histogram(
            PREFIX + "time_per_output_token_seconds",
            "Mean time between output tokens after the first, per sequence.",
            TPOT_BUCKETS,
        )
        self.e2e = Histogram(
            PREFIX + "e2e_request_latency_seconds",
            "Time from a request's arrival to its last token.",
            E2E_BUCKETS,
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
        self.prompt_tokens += num_prompt_tokens
        self.generation_tokens += num_output_tokens
        reason = finish_reason if finish_reason in self.finished else "abort"
        self.finished[reason] += 1
        if ttft is None:
            return
        self.ttft.observe(ttft)
        self.e2e.observe(latency)
        if num_output_tokens > 1:
            self.tpot.observe((latency - ttft) / (num_output_tokens - 1))

    def render(self, stats: SchedulerStats) -> str:
        """The text exposition of every series, ``stats`` giving the scheduler's."""
        lines: list[str] = []
        gauge = self._simple("gauge", lines)
        counter = self._simple("counter", lines)
        gauge("num_requests_running", "Sequences in the running batch.", stats.num_running)
        gauge("num_requests_waiting", "Sequences waiting to be scheduled.", stats.num_waiting)
        gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0 to 1).",
              stats.kv_cache_usage)  # fmt: skip
        gauge("prefix_cache_hit_rate", "Prompt tokens found in the prefix cache / looked up.",
              stats.prefix_cache_hit_rate)  # fmt: skip
        counter("prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache.",
                stats.prefix_cache_queries)  # fmt: skip
        counter("prefix_cache_hits_total", "Prompt tokens found in the prefix cache.",
                stats.prefix_cache_hits)  # fmt: skip
        counter("num_preemptions_total", "Preemptions (a sequence lost its KV blocks).",
                stats.num_preemptions_total)  # fmt: skip
        counter("prompt_tokens_total", "Prompt tokens of finished requests.", self.prompt_tokens)
        counter("generation_tokens_total", "Generated tokens of finished requests.",
                self.generation_tokens)  # fmt: skip
        name = PREFIX + "request_success_total"
        lines += [f"# HELP {name} Finished requests by finish reason.", f"# TYPE {name} counter"]
        for reason, count in self.finished.items():
            lines.append(f'{name}{{{self._labels()},finished_reason="{reason}"}} {count}')
        for histogram in (self.ttft, self.tpot, self.e2e):
            lines += histogram.render(self._labels())
        return "\n".join(lines) + "\n"

    def _labels(self) -> str:
        escaped = self.model_name.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'model_name="{escaped}"'

    def _simple(self, kind: str, lines: list[str]):  # type: ignore[no-untyped-def]
        def add(name: str, help_text: str, value: float) -> None:
            full = PREFIX + name
            lines.extend(
                [
                    f"# HELP {full} {help_text}",
                    f"# TYPE {full} {kind}",
                    f"{full}{{{self._labels()}}} {_number(value)}",
                ]
            )

        return add


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    return repr(float(value))
