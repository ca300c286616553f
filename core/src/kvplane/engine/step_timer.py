"""Host wall time per phase of the engine step, for profiling where a step's time goes.

Off by default (one attribute test per phase); ``kvplane bench throughput`` and the GPU
suite turn it on. Phases: ``schedule``, ``prepare`` (inputs), ``forward`` and ``sample``
(launching the work), ``wait`` (overlapped steps: waiting for the previous step's tokens,
the time the host has nothing to do) and ``update`` (processing the sampled tokens).
Step by step, the wait for the tokens falls between the phases, and every phase is time
the device sits idle; overlapped, the host phases are on the device's critical path only
where ``wait`` is near zero.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class StepTimer:
    """Accumulates seconds per named phase over many steps."""

    def __init__(self, enabled: bool = False) -> None:
        self.enabled = enabled
        self.seconds: dict[str, float] = {}
        self.num_steps = 0

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started

    def count_step(self) -> None:
        if self.enabled:
            self.num_steps += 1

    def reset(self) -> None:
        self.seconds.clear()
        self.num_steps = 0

    def summary(self) -> dict[str, float]:
        """Milliseconds per step for each phase, plus ``steps``."""
        steps = max(self.num_steps, 1)
        report = {name: 1000.0 * total / steps for name, total in self.seconds.items()}
        report["steps"] = float(self.num_steps)
        return report
