"""The step timer's accounting of large decode steps: periods and host phases."""

from __future__ import annotations

import time

import pytest

from kvplane.engine.step_timer import StepTimer


def _step(timer: StepTimer, num_seqs: int, is_decode: bool, host_s: float, wait_s: float) -> None:
    timer.count_step()
    with timer.phase("schedule"):
        time.sleep(host_s)
    timer.label_step(num_seqs, is_decode)
    with timer.phase("wait"):
        time.sleep(wait_s)


def test_only_large_decode_periods_are_accounted_apart() -> None:
    timer = StepTimer(enabled=True, large_batch=4)
    _step(timer, 8, False, 0.001, 0.05)  # a prefill step: not counted apart
    _step(timer, 2, True, 0.001, 0.05)  # a small decode step: not counted apart
    _step(timer, 4, True, 0.01, 0.02)
    _step(timer, 6, True, 0.01, 0.02)
    timer.count_step()  # closes the last period
    large = timer.large_decode_summary()
    assert large["steps"] == 2
    assert large["schedule"] == pytest.approx(10.0, abs=5.0)
    assert large["step"] >= large["schedule"] + large["wait"] - 0.5
    assert large["host"] == large["schedule"]  # prepare and update never ran
    assert 0.15 < large["host_share"] < 0.6
    assert timer.summary()["steps"] == 5
    timer.reset()
    assert timer.large_decode_summary() == {}


def test_a_disabled_timer_counts_nothing() -> None:
    timer = StepTimer()
    _step(timer, 300, True, 0.0, 0.0)
    timer.count_step()
    assert timer.large_decode_summary() == {} and timer.num_steps == 0
