"""Graph capture: run fixed-shape steps, captured once and replayed where a platform can."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class GraphRunner(ABC):
    """Runs a step function for a given batch-size bucket.

    The engine pads a step to a bucket size, writes its inputs into static buffers and
    calls :meth:`run` with a function that reads only those buffers. A capturing runner
    records the function on the first call per bucket and replays it afterwards, so the
    function must have no side effects besides writing its outputs.
    """

    @abstractmethod
    def can_run(self, batch_size: int) -> bool:
        """Whether ``batch_size`` is one of this runner's buckets."""

    @abstractmethod
    def run(self, batch_size: int, step: Callable[[], T]) -> T:
        """Run ``step`` for bucket ``batch_size`` and return its outputs."""


class EagerGraphRunner(GraphRunner):
    """The reference: no capture, every call runs the function directly."""

    def can_run(self, batch_size: int) -> bool:
        return False

    def run(self, batch_size: int, step: Callable[[], T]) -> T:
        return step()
