"""The step timer's accounting of large decode steps: periods and host phases, on a
clock the test advances (no sleeps, nothing the machine's load can change)."""

from __future__ import annotations

import pytest

from kvplane.engine.step_timer import StepTimer


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _step(
    timer: StepTimer, clock: _Clock, num_seqs: int, is_decode: bool, host_s: float, wait_s: float
) -> None:
    timer.count_step()
    with timer.phase("schedule"):
        clock.now += host_s
    timer.label_step(num_seqs, is_decode)
    with timer.phase("wait"):
        clock.now += wait_s


def test_only_large_decode_periods_are_accounted_apart() -> None:
    clock = _Clock()
    timer = StepTimer(enabled=True, large_batch=4, clock=clock)
    _step(timer, clock, 8, False, 0.001, 0.05)  # a prefill step: not counted apart
    _step(timer, clock, 2, True, 0.001, 0.05)  # a small decode step: not counted apart
    _step(timer, clock, 4, True, 0.010, 0.020)
    clock.now += 0.005  # time outside every phase still belongs to the period
    _step(timer, clock, 6, True, 0.010, 0.030)
    timer.count_step()  # closes the last period
    large = timer.large_decode_summary()
    assert large["steps"] == 2
    assert large["schedule"] == pytest.approx(10.0)
    assert large["wait"] == pytest.approx(25.0)
    assert large["step"] == pytest.approx(37.5)
    assert large["host"] == pytest.approx(10.0)  # prepare and update never ran
    assert large["host_share"] == pytest.approx(10.0 / 37.5)
    assert timer.summary()["steps"] == 5
    timer.reset()
    assert timer.large_decode_summary() == {}


def test_a_disabled_timer_counts_nothing() -> None:
    clock = _Clock()
    timer = StepTimer(clock=clock)
    _step(timer, clock, 300, True, 0.01, 0.01)
    timer.count_step()
    assert timer.large_decode_summary() == {} and timer.num_steps == 0
