"""The engine loop's stats line: throughput, queue, KV-cache usage and where the loop's
time went, once per interval while there is work, nothing while idle."""

from __future__ import annotations

import logging
import time
from types import SimpleNamespace

import pytest

from kvplane.engine.loop_stats import LoopStats
from kvplane.engine.step_timer import StepTimer
from kvplane.scheduler.output import SchedulerStats


def fake_engine() -> SimpleNamespace:
    stats = SchedulerStats(
        num_running=3,
        num_waiting=2,
        kv_cache_usage=0.25,
        prefix_cache_queries=0,
        prefix_cache_hits=0,
        num_preemptions_total=0,
    )
    return SimpleNamespace(
        num_generated_tokens=0,
        num_scheduled_tokens=0,
        runner=SimpleNamespace(timer=StepTimer()),
        stats=lambda: stats,
    )


def test_a_line_per_interval_with_work(caplog: pytest.LogCaptureFixture) -> None:
    engine = fake_engine()
    loop_stats = LoopStats(engine, interval_s=0.05)
    assert engine.runner.timer.enabled
    caplog.set_level(logging.INFO, logger="kvplane.engine.stats")
    with loop_stats.phase("step"), engine.runner.timer.phase("forward"):
        time.sleep(0.06)
        engine.num_generated_tokens += 30
        engine.num_scheduled_tokens += 300
    loop_stats.count_step()
    engine.runner.timer.count_step()
    loop_stats.maybe_log()
    (line,) = [r.getMessage() for r in caplog.records]
    assert "running 3, waiting 2, KV cache 25%" in line
    assert "scheduled and" in line and "generated tokens/s" in line
    assert "loop: step " in line and "forward " in line
    step_share = int(line.split("loop: step ")[1].split("%")[0])
    assert 50 <= step_share <= 100
    caplog.clear()
    time.sleep(0.06)  # an interval without a step: no line
    loop_stats.maybe_log()
    assert not caplog.records


def test_interval_zero_is_off() -> None:
    engine = fake_engine()
    loop_stats = LoopStats(engine, interval_s=0)
    assert not loop_stats.enabled and not engine.runner.timer.enabled
