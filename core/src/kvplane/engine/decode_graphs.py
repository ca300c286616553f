"""Decode steps replayed from captured graphs: static inputs, one graph per batch bucket.

A decode step (one new token per sequence) launches the same kernels every time; only the
batch size and the buffer contents change. :class:`DecodeGraphs` pads the batch to the next
bucket size, copies the step's host arrays into static device buffers, and asks the
platform's :class:`~kvplane.engine.graph_runner.GraphRunner` to run the model over those
buffers: a capturing runner records the forward once per bucket and replays it after,
so a step costs a handful of copies and one graph launch instead of hundreds of kernel
launches from Python.

What a captured forward sees, and therefore what every attention backend of a platform
that captures must honour: ``max_query_len`` is 1 and ``max_seq_len`` is the model's
maximum length (an upper bound; the true lengths are in ``seq_lens``), and the host
copies ``*_cpu`` are placeholders of the right length only. Padding sequences have one
token at position 0, a cache slot of -1 (nothing written) and block table row 0; their
outputs are discarded.
"""

from __future__ import annotations

import bisect
import logging
import math
import time
from collections.abc import Callable

import torch

from kvplane.attention.metadata import AttentionMetadata
from kvplane.engine.graph_runner import GraphRunner
from kvplane.engine.inputs import HostStepInputs, PlaceholderFixup

logger = logging.getLogger(__name__)

#: Graphs are captured for batch sizes up to this many sequences at most.
MAX_CAPTURE_SIZE = 512


def bucket_sizes(max_num_seqs: int) -> tuple[int, ...]:
    """1, 2, 4, then multiples of 8, up to the first size >= ``max_num_seqs`` (capped)."""
    limit = min(max_num_seqs, MAX_CAPTURE_SIZE)
    candidates = [1, 2, 4, *range(8, MAX_CAPTURE_SIZE + 8, 8)]
    sizes = [size for size in candidates if size < limit]
    sizes.append(next(size for size in candidates if size >= limit))
    return tuple(sizes)


class DecodeGraphs:
    """Static decode inputs plus the graph runner that replays the model over them."""

    def __init__(
        self,
        model: torch.nn.Module,
        graph_runner: GraphRunner,
        device: torch.device,
        block_size: int,
        max_model_len: int,
        max_num_seqs: int,
        pin_memory: bool,
    ) -> None:
        self.model = model
        self.graph_runner = graph_runner
        self.max_model_len = max_model_len
        self.sizes = bucket_sizes(max_num_seqs)
        max_size = self.sizes[-1]
        max_blocks = math.ceil(max_model_len / block_size)

        def buffer(*shape: int, dtype: torch.dtype, fill: int) -> torch.Tensor:
            return torch.full(shape, fill, dtype=dtype, device=device)

        # Device buffers the captured forward reads; never reallocated.
        self.token_ids = buffer(max_size, dtype=torch.int64, fill=0)
        self.positions = buffer(max_size, dtype=torch.int64, fill=0)
        self.slot_mapping = buffer(max_size, dtype=torch.int64, fill=-1)
        self.query_start_loc = torch.arange(max_size + 1, dtype=torch.int32, device=device)
        self.seq_lens = buffer(max_size, dtype=torch.int32, fill=1)
        self.block_tables = buffer(max_size, max_blocks, dtype=torch.int32, fill=0)
        # Host staging, pinned where the platform can (then the copies do not wait for
        # the device); two sets, so a step can be staged while the last one's copies run.
        self._staging = [_Staging(max_size, max_blocks, pin_memory) for _ in range(2)]
        self._next_staging = 0
        self._metadata = {size: self._bucket_metadata(size) for size in self.sizes}
        self._steps = {size: self._step_function(size) for size in self.sizes}

    def bucket_for(self, host: HostStepInputs) -> int | None:
        """The bucket a step runs in, or ``None`` if it must run eagerly."""
        if not host.is_pure_decode or host.num_seqs > self.sizes[-1]:
            return None
        size = self.sizes[bisect.bisect_left(self.sizes, host.num_seqs)]
        return size if self.graph_runner.can_run(size) else None

    def capture(self) -> None:
        """Record every bucket (largest first, so smaller ones reuse its memory)."""
        started = time.perf_counter()
        for size in reversed(self.sizes):
            if self.graph_runner.can_run(size):
                self._stage_padding(size)
                self.graph_runner.run(size, self._steps[size])
        logger.info(
            "captured decode graphs for %d batch sizes (up to %d) in %.1f s",
            len(self.sizes),
            self.sizes[-1],
            time.perf_counter() - started,
        )

    def run(
        self, host: HostStepInputs, size: int, fixup: PlaceholderFixup | None = None
    ) -> torch.Tensor:
        """Run the decode step ``host`` in bucket ``size``; returns hidden states
        ``[num_seqs, hidden_size]`` (a view of the graph's output: use before the next run).
        ``fixup`` fills placeholder input tokens from the previous step's samples."""
        staging = self._staging[self._next_staging]
        self._next_staging ^= 1
        staging.fill(host, size)
        self._upload(staging, size)
        if fixup is not None:
            fixup.apply(self.token_ids[: host.num_seqs])
        hidden = self.graph_runner.run(size, self._steps[size])
        return hidden[: host.num_seqs]

    # -- internals -----------------------------------------------------------------------

    def _bucket_metadata(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:size],
            query_start_loc=self.query_start_loc[: size + 1],
            seq_lens=self.seq_lens[:size],
            block_tables=self.block_tables[:size],
            max_query_len=1,
            max_seq_len=self.max_model_len,
            query_start_loc_cpu=tuple(range(size + 1)),
            seq_lens_cpu=(1,) * size,
        )

    def _step_function(self, size: int) -> Callable[[], torch.Tensor]:
        """The forward of bucket ``size`` over the static buffers (what gets captured)."""
        metadata = self._metadata[size]
        token_ids, positions = self.token_ids[:size], self.positions[:size]

        def step() -> torch.Tensor:  # [size, hidden_size]
            return self.model(token_ids, positions, metadata)

        return step

    def _stage_padding(self, size: int) -> None:
        staging = self._staging[self._next_staging]
        self._next_staging ^= 1
        staging.fill_padding(0, size)
        self._upload(staging, size)

    def _upload(self, staging: _Staging, size: int) -> None:
        self.token_ids[:size].copy_(staging.token_ids[:size], non_blocking=True)
        self.positions[:size].copy_(staging.positions[:size], non_blocking=True)
        self.slot_mapping[:size].copy_(staging.slot_mapping[:size], non_blocking=True)
        self.seq_lens[:size].copy_(staging.seq_lens[:size], non_blocking=True)
        num_cols = staging.num_cols
        self.block_tables[:size, :num_cols].copy_(
            staging.block_tables[:size, :num_cols], non_blocking=True
        )


class _Staging:
    """Host copies of the static buffers, filled with numpy before each upload."""

    def __init__(self, max_size: int, max_blocks: int, pin_memory: bool) -> None:
        def host(*shape: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, pin_memory=pin_memory)

        self.token_ids = host(max_size, dtype=torch.int64)
        self.positions = host(max_size, dtype=torch.int64)
        self.slot_mapping = host(max_size, dtype=torch.int64)
        self.seq_lens = host(max_size, dtype=torch.int32)
        self.block_tables = host(max_size, max_blocks, dtype=torch.int32)
        self.num_cols = 1  # block-table columns the last fill wrote
        self._arrays = {
            name: getattr(self, name).numpy()
            for name in ("token_ids", "positions", "slot_mapping", "seq_lens", "block_tables")
        }

    def fill(self, host: HostStepInputs, size: int) -> None:
        arrays, num_seqs = self._arrays, host.num_seqs
        arrays["token_ids"][:num_seqs] = host.token_ids
        arrays["positions"][:num_seqs] = host.positions
        arrays["slot_mapping"][:num_seqs] = host.slot_mapping
        arrays["seq_lens"][:num_seqs] = host.seq_lens
        num_cols = host.block_tables.shape[1]
        arrays["block_tables"][:num_seqs, :num_cols] = host.block_tables
        self.num_cols = num_cols
        self.fill_padding(num_seqs, size)

    def fill_padding(self, first: int, size: int) -> None:
        arrays = self._arrays
        arrays["token_ids"][first:size] = 0
        arrays["positions"][first:size] = 0
        arrays["slot_mapping"][first:size] = -1
        arrays["seq_lens"][first:size] = 1
        arrays["block_tables"][first:size, : self.num_cols] = 0


__all__ = ["DecodeGraphs", "bucket_sizes"]
