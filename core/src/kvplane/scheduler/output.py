"""What one scheduling step decided, handed from the scheduler to the model runner."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from kvplane.scheduler.request import Request

if TYPE_CHECKING:
    from kvplane.spec_decode.metrics import SpecDecodeStats


@dataclass(frozen=True, slots=True)
class ScheduledRequest:
    """Compute tokens ``start_position : start_position + num_new_tokens`` of ``request``.

    Their KV goes to the request's block table after allocation, row
    ``block_table_row`` of the output's ``block_table``, whose first ``num_blocks``
    entries are its blocks: token ``i`` at slot
    ``table[i // block_size] * block_size + i % block_size``.
    ``is_sampling``: the step computes the request's last known token, so the engine
    samples the next one from that position's logits. ``spec_token_ids``: draft tokens
    (speculative decoding) computed after it, the last ``len(spec_token_ids)`` of the
    ``num_new_tokens``; the engine samples at each of them too and keeps the drafts its
    samples agree with (then ``is_sampling`` is always true).
    """

    request: Request
    num_new_tokens: int
    start_position: int  # num_computed_tokens before the step
    num_blocks: int  # the length of the request's block table
    is_sampling: bool
    block_table_row: int
    spec_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class ForkedRequest:
    """A parallel-sampling child forked off ``parent_id`` in this step.

    It shares the parent's blocks and computes nothing this step: the engine samples its
    first token from the parent's last-token logits (the parent is sampling this step).
    """

    child: Request
    parent_id: str


@dataclass(frozen=True, slots=True)
class SchedulerOutput:
    """One step: run ``scheduled`` after applying ``block_copies`` (in list order).

    ``block_copies`` are copy-on-write ``(src_block, dst_block)`` pairs; a block can be
    the source of a copy and the destination of a later one, so apply them in order or
    read every source before writing any destination (as the reference hook does).
    ``preempted_request_ids`` lost their blocks this step and will recompute later.
    ``block_table`` (``[rows, cols]`` int32, zero past each table's end) holds every
    scheduled request's block table at its ``block_table_row``; it is the block
    manager's live array, so it holds this step's tables only until the next schedule.
    """

    scheduled: tuple[ScheduledRequest, ...]
    forked: tuple[ForkedRequest, ...]
    block_copies: tuple[tuple[int, int], ...]
    preempted_request_ids: tuple[str, ...]
    num_batched_tokens: int
    block_table: np.ndarray

    @property
    def is_empty(self) -> bool:
        """Nothing to run (no scheduled tokens and no child to sample)."""
        return not self.scheduled and not self.forked


@dataclass(frozen=True, slots=True)
class SchedulerStats:
    """A snapshot for metrics; token counts for the prefix cache. ``spec_decode``: the
    engine's speculative-decoding counters (None without speculation; the engine adds
    them, the scheduler leaves them out)."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float  # fraction of KV blocks held by requests
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions_total: int
    spec_decode: SpecDecodeStats | None = None

    @property
    def prefix_cache_hit_rate(self) -> float:
        if self.prefix_cache_queries == 0:
            return 0.0
        return self.prefix_cache_hits / self.prefix_cache_queries
