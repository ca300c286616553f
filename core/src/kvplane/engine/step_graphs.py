"""Steps replayed from captured graphs: static inputs, one graph per bucket.

A step launches the same kernels every time; only the batch's shape and the buffers'
contents change. A :class:`StepGraphs` pads a step to the next bucket, copies its host
arrays into static device buffers, and asks the platform's
:class:`~kvplane.engine.graph_runner.GraphRunner` to run the model over those buffers: a
capturing runner records the forward once per bucket and replays it after, so a step
costs a handful of copies and one graph launch instead of hundreds of kernel launches
from Python. Two families:

- :class:`DecodeGraphs`: one new token per sequence, bucketed by the number of sequences.
  The captured metadata has ``max_query_len`` 1. Padding sequences have one token at
  position 0, a cache slot of -1 (nothing written), seq_len 1 and block-table row 0.
- :class:`MixedGraphs`: steps of any other shape (prefill chunks next to decodes),
  bucketed by the number of tokens ``B``; they hold up to ``min(B, max_num_seqs) + 1``
  sequences. The captured metadata has ``max_query_len`` ``B`` (an upper bound). The
  ``B - T`` padding tokens of a step with ``T`` real ones form one dummy sequence after
  the real ones (seq_len ``B - T``, slots -1, block-table row 0, positions 0); the
  sequences after it have no token and seq_len 0. Logit rows are gathered from the
  graph's output outside the graph.

What a captured forward sees, and therefore what every attention backend of a platform
that captures must honour: ``max_seq_len`` is the model's maximum length (an upper bound;
the true lengths are in ``seq_lens``), ``max_query_len`` as above, and the host copies
``*_cpu`` are placeholders of the right length only. Outputs of padding rows are
discarded.
"""

from __future__ import annotations

import bisect
import logging
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable

import numpy as np
import torch

from kvplane.attention.metadata import AttentionMetadata
from kvplane.config import EngineConfig
from kvplane.engine.graph_runner import GraphRunner
from kvplane.engine.inputs import HostStepInputs, PlaceholderFixup
from kvplane.engine.transfer import DeviceTransfer
from kvplane.models.base import CausalLM

logger = logging.getLogger(__name__)

#: Decode graphs are captured for batches of up to this many sequences.
MAX_CAPTURE_SIZE = 512
#: Default largest mixed step captured, in tokens (``EngineConfig.max_mixed_graph_tokens``).
MAX_MIXED_CAPTURE_TOKENS = 512
#: Token buckets of mixed steps: fine where a step is launch-bound, coarser above (a
#: step pads by at most a quarter of its bucket past 512 tokens).
MIXED_TOKEN_SIZES = (
    16, 32, 48, 64, 96, 128, 192, 256, 320, 384, 448, 512,
    640, 768, 896, 1024, 1280, 1536, 1792, 2048, 2560, 3072, 3584, 4096,
    5120, 6144, 7168, 8192, 10240, 12288, 14336, 16384,
)  # fmt: skip


def _sizes_up_to(candidates: list[int], limit: int) -> tuple[int, ...]:
    """The candidates below ``limit`` plus the first one at or above it."""
    sizes = [size for size in candidates if size < limit]
    sizes.append(next(size for size in candidates if size >= limit))
    return tuple(sizes)


def decode_bucket_sizes(max_num_seqs: int) -> tuple[int, ...]:
    """Decode buckets: 1, 2, 4, then multiples of 8, up to the first size >= ``max_num_seqs``
    (capped at :data:`MAX_CAPTURE_SIZE`)."""
    candidates = [1, 2, 4, *range(8, MAX_CAPTURE_SIZE + 8, 8)]
    return _sizes_up_to(candidates, min(max_num_seqs, MAX_CAPTURE_SIZE))


def mixed_bucket_sizes(max_num_batched_tokens: int, max_tokens: int) -> tuple[int, ...]:
    """Mixed-step token buckets up to ``min(max_num_batched_tokens, max_tokens)``; empty
    when ``max_tokens`` is below 2 (a one-token step is a decode)."""
    limit = min(max_num_batched_tokens, max_tokens, MIXED_TOKEN_SIZES[-1])
    if limit < 2:
        return ()
    return _sizes_up_to(list(MIXED_TOKEN_SIZES), limit)


def graph_families(config: EngineConfig) -> list[tuple[type[StepGraphs], tuple[int, ...]]]:
    """The graph families ``config`` asks for, each with its buckets (none when empty)."""
    limits = config.batch_limits()
    families: list[tuple[type[StepGraphs], tuple[int, ...]]] = [
        (DecodeGraphs, decode_bucket_sizes(limits.max_num_seqs)),
        (
            MixedGraphs,
            mixed_bucket_sizes(limits.max_num_batched_tokens, config.max_mixed_graph_tokens),
        ),
    ]
    return [(graphs_class, sizes) for graphs_class, sizes in families if sizes]


def layers_that_cannot_be_captured(model: torch.nn.Module) -> list[str]:
    """Layers that flag what a graph cannot hold (an attention backend reading host
    copies, an op that reads device values on the host), with their backend if any."""

    def describe(module: torch.nn.Module) -> str:
        backend = getattr(module, "backend_name", None)
        return f"{type(module).__name__} ({backend})" if backend else type(module).__name__

    return sorted(
        {
            describe(module)
            for module in model.modules()
            if getattr(module, "supports_graph_capture", True) is False
        }
    )


class StepGraphs(ABC):
    """Static step inputs plus the graph runner that replays the model over them.

    Subclasses say which steps a bucket takes and how it is padded; a bucket of size
    ``s`` holds ``s`` tokens and ``num_bucket_seqs(s)`` sequences.
    """

    #: ``GraphCaptureRequest.step_kind`` of the family (also named in logs).
    step_kind: str
    #: Whether ``query_start_loc`` changes between steps (decode buckets keep 0, 1, 2, ...).
    uploads_query_start_loc = True

    def __init__(
        self,
        model: CausalLM,
        graph_runner: GraphRunner,
        transfer: DeviceTransfer,
        block_size: int,
        max_model_len: int,
        sizes: tuple[int, ...],
        max_num_seqs: int | None = None,  # None: as many as a bucket's tokens
    ) -> None:
        self.model = model
        self.graph_runner = graph_runner
        self.transfer = transfer
        self.max_model_len = max_model_len
        self.sizes = sizes
        self.max_num_seqs = max_num_seqs
        max_tokens = sizes[-1]
        max_seqs = self.num_bucket_seqs(sizes[-1])
        max_blocks = math.ceil(max_model_len / block_size)

        device = transfer.device

        def buffer(*shape: int, dtype: torch.dtype, fill: int) -> torch.Tensor:
            return torch.full(shape, fill, dtype=dtype, device=device)

        # Device buffers the captured forward reads; never reallocated.
        self.token_ids = buffer(max_tokens, dtype=torch.int64, fill=0)
        self.positions = buffer(max_tokens, dtype=torch.int64, fill=0)
        self.slot_mapping = buffer(max_tokens, dtype=torch.int64, fill=-1)
        self.query_start_loc = torch.arange(max_seqs + 1, dtype=torch.int32, device=device)
        self.seq_lens = buffer(max_seqs, dtype=torch.int32, fill=1)
        self.block_tables = buffer(max_seqs, max_blocks, dtype=torch.int32, fill=0)
        # Host staging, pinned where the platform can (then the copies do not wait for
        # the device); two sets, so a step can be staged while the last one's copies run.
        self._staging = [_Staging(max_tokens, max_seqs, max_blocks, transfer) for _ in range(2)]
        self._next_staging = 0
        self._metadata = {size: self._bucket_metadata(size) for size in sizes}
        self._steps = {size: self._step_function(size) for size in sizes}

    # -- what subclasses define ----------------------------------------------------------

    @abstractmethod
    def num_bucket_seqs(self, size: int) -> int:
        """Sequences a bucket of ``size`` tokens holds, padding ones included."""

    @abstractmethod
    def bucket_for(self, host: HostStepInputs) -> int | None:
        """The bucket a step runs in, or ``None`` if it must run eagerly."""

    @abstractmethod
    def _max_query_len(self, size: int) -> int:
        """The captured metadata's ``max_query_len`` (an upper bound)."""

    @abstractmethod
    def _pad(self, staging: _Staging, host: HostStepInputs | None, size: int) -> None:
        """Fill the bucket's rows after ``host``'s (all of them when ``host`` is None)."""

    @abstractmethod
    def _logit_rows(
        self, hidden: torch.Tensor, host: HostStepInputs, staging: _Staging
    ) -> torch.Tensor:
        """The rows of ``hidden`` (the graph's output) that ``host`` takes logits of;
        ``staging`` is the set the step was staged in."""

    # -- shared --------------------------------------------------------------------------

    def capture(self) -> None:
        """Record every bucket (largest first, so smaller ones reuse its memory)."""
        started = time.perf_counter()
        for size in reversed(self.sizes):
            if self.graph_runner.can_run(size):
                self._stage(None, size)
                self.graph_runner.run(size, self._steps[size])
        logger.info(
            "captured %s graphs for %d buckets (up to %d) in %.1f s",
            self.step_kind,
            len(self.sizes),
            self.sizes[-1],
            time.perf_counter() - started,
        )

    def run(
        self, host: HostStepInputs, bucket: int, fixup: PlaceholderFixup | None = None
    ) -> torch.Tensor:
        """Run the step ``host`` in ``bucket`` (from :meth:`bucket_for`); returns the hidden
        states of its logit rows ``[len(host.logits_indices), hidden_size]`` (may be a view
        of the graph's output: use it before the next run). ``fixup`` fills placeholder
        input tokens from the previous step's samples."""
        staging = self._stage(host, bucket)
        if fixup is not None:
            fixup.apply(self.token_ids[: host.num_tokens])
        hidden = self.graph_runner.run(bucket, self._steps[bucket])
        return self._logit_rows(hidden, host, staging)

    def _bucket_metadata(self, size: int) -> AttentionMetadata:
        num_seqs = self.num_bucket_seqs(size)
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:size],
            query_start_loc=self.query_start_loc[: num_seqs + 1],
            seq_lens=self.seq_lens[:num_seqs],
            block_tables=self.block_tables[:num_seqs],
            max_query_len=self._max_query_len(size),
            max_seq_len=self.max_model_len,
            # Placeholders; their last entry still counts the bucket's tokens.
            query_start_loc_cpu=(*(min(i, size) for i in range(num_seqs)), size),
            seq_lens_cpu=(1,) * num_seqs,
        )

    def _step_function(self, size: int) -> Callable[[], torch.Tensor]:
        """The forward of bucket ``size`` over the static buffers (what gets captured)."""
        metadata = self._metadata[size]
        token_ids, positions = self.token_ids[:size], self.positions[:size]

        def step() -> torch.Tensor:  # [size, hidden_size]
            return self.model(token_ids, positions, metadata)

        return step

    def _stage(self, host: HostStepInputs | None, size: int) -> _Staging:
        """Write ``host`` (or padding only) into the next staging set and upload it.

        A set is refilled only two steps later, once its copies have run (the engine
        waits for each step's tokens before it launches the step after the next)."""
        staging = self._staging[self._next_staging]
        self._next_staging ^= 1
        if host is not None:
            staging.fill(host)
        self._pad(staging, host, size)
        self._upload(staging, size)
        return staging

    def _upload(self, staging: _Staging, size: int) -> None:
        num_seqs = self.num_bucket_seqs(size)
        copy = self.transfer.copy_to_device
        for name in ("token_ids", "positions", "slot_mapping"):
            copy(getattr(staging, name)[:size], getattr(self, name)[:size])
        copy(staging.seq_lens[:num_seqs], self.seq_lens[:num_seqs])
        if self.uploads_query_start_loc:
            copy(staging.query_start_loc[: num_seqs + 1], self.query_start_loc[: num_seqs + 1])
        num_cols = staging.num_cols
        copy(staging.block_tables[:num_seqs, :num_cols], self.block_tables[:num_seqs, :num_cols])


class DecodeGraphs(StepGraphs):
    """Pure decode steps (one token per sequence, each a logit row), by sequence count."""

    step_kind = "decode"
    uploads_query_start_loc = False

    def num_bucket_seqs(self, size: int) -> int:
        return size

    def bucket_for(self, host: HostStepInputs) -> int | None:
        if not host.is_pure_decode or host.num_seqs > self.sizes[-1]:
            return None
        size = self.sizes[bisect.bisect_left(self.sizes, host.num_seqs)]
        return size if self.graph_runner.can_run(size) else None

    def _max_query_len(self, size: int) -> int:
        return 1

    def _pad(self, staging: _Staging, host: HostStepInputs | None, size: int) -> None:
        first = 0 if host is None else host.num_seqs
        arrays = staging.arrays
        arrays["token_ids"][first:size] = 0
        arrays["positions"][first:size] = 0
        arrays["slot_mapping"][first:size] = -1
        arrays["seq_lens"][first:size] = 1
        arrays["block_tables"][first:size, : staging.num_cols] = 0

    def _logit_rows(
        self, hidden: torch.Tensor, host: HostStepInputs, staging: _Staging
    ) -> torch.Tensor:
        return hidden[: host.num_seqs]  # logits row i is sequence i's only token


class MixedGraphs(StepGraphs):
    """Steps that are not pure decodes, of at most ``sizes[-1]`` tokens, by token count."""

    step_kind = "mixed"

    def num_bucket_seqs(self, size: int) -> int:
        # Every sequence has a token (at most max_num_seqs of them), plus the padding
        # tokens' own.
        real = size if self.max_num_seqs is None else min(size, self.max_num_seqs)
        return real + 1

    def bucket_for(self, host: HostStepInputs) -> int | None:
        if host.is_pure_decode or host.num_tokens > self.sizes[-1]:
            return None
        size = self.sizes[bisect.bisect_left(self.sizes, host.num_tokens)]
        if host.num_seqs >= self.num_bucket_seqs(size):
            return None  # a zero-token sequence in the step: no room for the padding one
        return size if self.graph_runner.can_run(size) else None

    def _max_query_len(self, size: int) -> int:
        return size

    def _pad(self, staging: _Staging, host: HostStepInputs | None, size: int) -> None:
        num_tokens = 0 if host is None else host.num_tokens
        num_seqs = 0 if host is None else host.num_seqs
        arrays = staging.arrays
        arrays["token_ids"][num_tokens:size] = 0
        arrays["positions"][num_tokens:size] = 0
        arrays["slot_mapping"][num_tokens:size] = -1
        # One dummy sequence holds the padding tokens; the ones after it hold none.
        bucket_seqs = self.num_bucket_seqs(size)
        arrays["query_start_loc"][num_seqs + 1 : bucket_seqs + 1] = size
        arrays["seq_lens"][num_seqs] = size - num_tokens
        arrays["seq_lens"][num_seqs + 1 : bucket_seqs] = 0
        arrays["block_tables"][num_seqs:bucket_seqs, : staging.num_cols] = 0

    def _logit_rows(
        self, hidden: torch.Tensor, host: HostStepInputs, staging: _Staging
    ) -> torch.Tensor:
        # Outside the graph: the rows' count varies within a bucket.
        indices = staging.logits_indices[: len(host.logits_indices)]
        return hidden.index_select(0, self.transfer.copy_to_device(indices))


class _Staging:
    """Host copies of the static buffers, filled with numpy before each upload."""

    def __init__(
        self, max_tokens: int, max_seqs: int, max_blocks: int, transfer: DeviceTransfer
    ) -> None:
        host = transfer.staging_buffer

        self.token_ids = host(max_tokens, dtype=torch.int64)
        self.positions = host(max_tokens, dtype=torch.int64)
        self.slot_mapping = host(max_tokens, dtype=torch.int64)
        self.logits_indices = host(max_tokens, dtype=torch.int64)
        self.query_start_loc = host(max_seqs + 1, dtype=torch.int32)
        self.seq_lens = host(max_seqs, dtype=torch.int32)
        self.block_tables = host(max_seqs, max_blocks, dtype=torch.int32)
        self.num_cols = 1  # block-table columns the last fill wrote
        names = (
            "token_ids",
            "positions",
            "slot_mapping",
            "logits_indices",
            "query_start_loc",
            "seq_lens",
            "block_tables",
        )
        self.arrays: dict[str, np.ndarray] = {name: getattr(self, name).numpy() for name in names}

    def fill(self, host: HostStepInputs) -> None:
        arrays, num_tokens, num_seqs = self.arrays, host.num_tokens, host.num_seqs
        arrays["token_ids"][:num_tokens] = host.token_ids
        arrays["positions"][:num_tokens] = host.positions
        arrays["slot_mapping"][:num_tokens] = host.slot_mapping
        arrays["logits_indices"][: len(host.logits_indices)] = host.logits_indices
        arrays["query_start_loc"][: num_seqs + 1] = host.query_start_loc
        arrays["seq_lens"][:num_seqs] = host.seq_lens
        num_cols = host.block_tables.shape[1]
        arrays["block_tables"][:num_seqs, :num_cols] = host.block_tables
        self.num_cols = num_cols


__all__ = [
    "MAX_CAPTURE_SIZE",
    "MAX_MIXED_CAPTURE_TOKENS",
    "MIXED_TOKEN_SIZES",
    "DecodeGraphs",
    "MixedGraphs",
    "StepGraphs",
    "decode_bucket_sizes",
    "graph_families",
    "layers_that_cannot_be_captured",
    "mixed_bucket_sizes",
]
