"""A periodic log line from the engine loop: what it made and where its time went.

Every ``log_stats_interval`` seconds in which the loop did something, the server's log
gets one line: steps and tokens per second, the scheduler's running / waiting counts and
KV-cache usage, the share of the loop's wall time spent stepping, handing outputs over
(``emit``), applying commands and idle (blocked waiting for a request), and the step's
own phases from the model runner's :class:`~kvplane.engine.step_timer.StepTimer`. It is
how one tells, on a live server, whether the device or the host's plumbing is the limit.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from kvplane.engine.step_timer import StepTimer

logger = logging.getLogger("kvplane.engine.stats")

#: The loop's phases, in the order the log line gives them.
LOOP_PHASES = ("step", "emit", "commands", "idle")


class LoopStats:
    """Accumulates the loop's phase times and logs them every ``interval_s`` (0: never)."""

    def __init__(self, engine: Any, interval_s: float) -> None:
        self.engine = engine
        self.interval_s = interval_s
        self.enabled = interval_s > 0
        # The loop's own phases (LOOP_PHASES), timed like the step's.
        self._loop_timer = StepTimer(enabled=self.enabled)
        self.phase = self._loop_timer.phase
        self._window_start = time.perf_counter()
        self._num_generated_start = 0
        self._num_scheduled_start = 0
        if self.enabled:
            engine.runner.timer.enabled = True

    def count_step(self) -> None:
        self._loop_timer.count_step()

    def maybe_log(self) -> None:
        """Log and start a new window once ``interval_s`` has passed (quiet while idle)."""
        if not self.enabled:
            return
        now = time.perf_counter()
        elapsed = now - self._window_start
        if elapsed < self.interval_s:
            return
        if self._loop_timer.num_steps:
            logger.info("%s", self._line(elapsed))
        self._reset(now)

    def _line(self, elapsed: float) -> str:
        engine = self.engine
        num_generated = engine.num_generated_tokens - self._num_generated_start
        num_scheduled = engine.num_scheduled_tokens - self._num_scheduled_start
        stats = engine.stats()
        seconds = self._loop_timer.seconds
        loop = ", ".join(
            f"{name} {100.0 * seconds.get(name, 0.0) / elapsed:.0f}%" for name in LOOP_PHASES
        )
        phases = engine.runner.timer.summary()
        num_timed_steps = phases.pop("steps", 0.0)
        step = ", ".join(f"{name} {ms:.2f}" for name, ms in phases.items())
        spec = stats.spec_decode
        speculation = (
            ""
            if spec is None
            else f"; {spec.method} drafts accepted {100.0 * spec.acceptance_rate:.0f}% "
            f"(mean accepted length {spec.mean_accepted_length:.2f}, since start)"
        )
        return (
            f"{self._loop_timer.num_steps / elapsed:.1f} steps/s, {num_scheduled / elapsed:,.0f} "
            f"scheduled and {num_generated / elapsed:,.0f} generated tokens/s; running "
            f"{stats.num_running}, waiting {stats.num_waiting}, KV cache "
            f"{100.0 * stats.kv_cache_usage:.0f}%{speculation}; loop: {loop}; ms per step "
            f"({num_timed_steps:.0f} steps): {step}"
        )

    def _reset(self, now: float) -> None:
        self._loop_timer.reset()
        self._window_start = now
        self._num_generated_start = self.engine.num_generated_tokens
        self._num_scheduled_start = self.engine.num_scheduled_tokens
        self.engine.runner.timer.reset()
