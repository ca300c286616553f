"""Graph capture: run fixed-shape steps, captured once and replayed where a platform can."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class GraphRunner(ABC):
    """Runs a step function for a given bucket.

    A bucket is a step's padded size: sequences for decode steps, tokens for mixed steps
    (``GraphCaptureRequest.step_kind``). The engine pads a step to a bucket, writes its
    inputs into static buffers and calls :meth:`run` with a function that reads only
    those buffers. A capturing runner records the function on the first call per bucket
    and replays it afterwards, so the function must have no side effects besides writing
    its outputs.
    """

    @abstractmethod
    def can_run(self, bucket: int) -> bool:
        """Whether ``bucket`` is one of this runner's buckets."""

    @abstractmethod
    def run(self, bucket: int, step: Callable[[], T]) -> T:
        """Run ``step`` for ``bucket`` and return its outputs."""
