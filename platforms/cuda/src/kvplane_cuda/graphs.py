"""CUDA graphs: each bucket's step captured once, replayed after.

A decode step of a small model is hundreds of short kernels; launched one by one from
Python, the launches take longer than the kernels (the GPU idles between them). A CUDA
graph records the launches once and replays them with one call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch

from kvplane.engine.graph_runner import GraphRunner

T = TypeVar("T")


class CudaGraphRunner(GraphRunner):
    """Captures ``step`` on the first :meth:`run` of a bucket and replays it afterwards.

    All graphs share one memory pool: the engine captures the largest bucket first, so
    the smaller ones fit in memory it already reserved. A captured step's outputs live in
    that pool and are overwritten by the next replay of any bucket.
    """

    def __init__(self, device: torch.device, bucket_sizes: tuple[int, ...]) -> None:
        self.device = device
        self.bucket_sizes = frozenset(bucket_sizes)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, Any] = {}
        self._pool: Any = None

    def can_run(self, bucket: int) -> bool:
        return bucket in self.bucket_sizes

    def run(self, bucket: int, step: Callable[[], T]) -> T:
        graph = self._graphs.get(bucket)
        if graph is None:
            return self._capture(bucket, step)
        graph.replay()
        return self._outputs[bucket]

    def _capture(self, bucket: int, step: Callable[[], T]) -> T:
        # One eager run first, on a side stream as capture requires: it compiles Triton
        # kernels and lets cuBLAS settle its workspaces, which must not happen mid-capture.
        # The step's only side effect is idempotent (KV-cache writes of the same values).
        side_stream = torch.cuda.Stream(self.device)
        side_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side_stream):
            step()
        torch.cuda.current_stream(self.device).wait_stream(side_stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            output = step()
        self._graphs[bucket] = graph
        self._outputs[bucket] = output
        graph.replay()  # capturing recorded the kernels without running them
        return output
