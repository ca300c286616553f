"""Host wall time per phase of the engine step, for profiling where a step's time goes.

Off by default (one attribute test per phase); ``kvplane bench throughput`` and the GPU
suite turn it on. Phases: ``schedule``, ``prepare`` (inputs), ``forward`` and ``sample``
(launching the work), ``wait`` (overlapped steps: waiting for the previous step's tokens,
the time the host has nothing to do) and ``update`` (processing the sampled tokens).
Step by step, the wait for the tokens falls between the phases, and every phase is time
the device sits idle; overlapped, the host phases are on the device's critical path only
where ``wait`` is near zero.

Decode steps of at least :attr:`StepTimer.large_batch` sequences are also accounted
apart (:meth:`StepTimer.large_decode_summary`): the host phases of each such step's
period (from its schedule to the next one's) against the period itself. In an
overlapped run whose ``wait`` is above zero the period is the device's time per step, so
the share says how much of the device's step the host's work would cost if it were not
overlapped.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

#: The phases that are host work on a step's critical path when steps do not overlap.
HOST_PHASES = ("schedule", "prepare", "update")


class StepTimer:
    """Accumulates seconds per named phase over many steps."""

    def __init__(
        self,
        enabled: bool = False,
        large_batch: int = 256,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.enabled = enabled
        self._clock = clock
        self.large_batch = large_batch
        self.seconds: dict[str, float] = {}
        self.num_steps = 0
        # Large decode steps: phase seconds and periods, summed over those steps.
        self.large_seconds: dict[str, float] = {}
        self.num_large_steps = 0
        self._period_start: float | None = None
        self._period_seconds: dict[str, float] = {}
        self._period_is_large = False

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        started = self._clock()
        try:
            yield
        finally:
            elapsed = self._clock() - started
            self.seconds[name] = self.seconds.get(name, 0.0) + elapsed
            self._period_seconds[name] = self._period_seconds.get(name, 0.0) + elapsed

    def count_step(self) -> None:
        """A step's period begins (before its schedule); the previous one ends."""
        if not self.enabled:
            return
        self.num_steps += 1
        now = self._clock()
        if self._period_is_large and self._period_start is not None:
            self.num_large_steps += 1
            totals = self.large_seconds
            totals["step"] = totals.get("step", 0.0) + now - self._period_start
            for name, seconds in self._period_seconds.items():
                totals[name] = totals.get(name, 0.0) + seconds
        self._period_start = now
        self._period_seconds = {}
        self._period_is_large = False

    def label_step(self, num_seqs: int, is_decode: bool) -> None:
        """What the step just scheduled holds: a decode step of ``num_seqs`` sequences
        at or above :attr:`large_batch` has its period accounted apart."""
        self._period_is_large = is_decode and num_seqs >= self.large_batch

    def reset(self) -> None:
        self.seconds.clear()
        self.num_steps = 0
        self.large_seconds.clear()
        self.num_large_steps = 0
        self._period_start = None
        self._period_seconds = {}
        self._period_is_large = False

    def large_decode_summary(self) -> dict[str, float]:
        """Over decode steps of at least :attr:`large_batch` sequences: ``steps``,
        milliseconds per step of each phase and of the whole period (``step``), ``host``
        (the :data:`HOST_PHASES`) and ``host_share`` (host / period); empty without any
        such step."""
        if not self.num_large_steps:
            return {}
        report = {
            name: 1000.0 * total / self.num_large_steps
            for name, total in self.large_seconds.items()
        }
        report["host"] = sum(report.get(name, 0.0) for name in HOST_PHASES)
        report["host_share"] = report["host"] / report["step"] if report["step"] else 0.0
        report["steps"] = float(self.num_large_steps)
        return report

    def summary(self) -> dict[str, float]:
        """Milliseconds per step for each phase, plus ``steps``."""
        steps = max(self.num_steps, 1)
        report = {name: 1000.0 * total / steps for name, total in self.seconds.items()}
        report["steps"] = float(self.num_steps)
        return report
