"""Speculative decoding in the engine loop: who gets drafts, how many, and the counts.

Between steps the engine calls :meth:`SpecDecoder.propose`: every running request whose
last token is known gets up to ``num_speculative_tokens`` drafts in
``Request.spec_token_ids``; the scheduler computes them with the request's last token in
the next step (budgeted like any token), the model runner samples at each of them and
keeps the ones the target agrees with (:mod:`kvplane.spec_decode.verification`), and the
scheduler advances by the accepted ones and releases the blocks of the rejected ones.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from kvplane.engine.model_runner import ModelRunner
from kvplane.sampling.state import SequenceSamplingState
from kvplane.scheduler.request import Request, RequestStatus
from kvplane.scheduler.scheduler import Scheduler
from kvplane.spec_decode.base import Proposer
from kvplane.spec_decode.config import SpeculativeConfig
from kvplane.spec_decode.metrics import SpecDecodeMetrics, SpecDecodeStats
from kvplane.spec_decode.verification import VerifiedDrafts

logger = logging.getLogger(__name__)


def can_speculate(state: SequenceSamplingState) -> bool:
    """Whether drafts can be verified for this sequence: its sampling must not read the
    tokens before each position (penalties, grammars, logits processors) and ``min_tokens``
    must be met (every sampled row is then processed alike)."""
    params = state.params
    return (
        not params.has_penalties
        and params.structured_output is None
        and state.allowed_mask_fn is None
        and not state.logits_processors
        and len(state.output_token_ids) >= params.min_tokens
    )


class SpecDecoder:
    """The proposer, the turn-down rule and the counters of one engine (its thread)."""

    def __init__(self, config: SpeculativeConfig, proposer: Proposer, max_model_len: int) -> None:
        self.config = config
        self.proposer = proposer
        self.max_model_len = max_model_len
        self.metrics = SpecDecodeMetrics(proposer.method, config.num_speculative_tokens)
        #: Whether the last :meth:`propose` drafted (False: turned down by batch size).
        self.is_enabled = True

    def propose(self, scheduler: Scheduler, states: Mapping[str, SequenceSamplingState]) -> None:
        """Set ``spec_token_ids`` of the running requests that can take drafts.

        Off while ``disable_by_batch_size`` or more sequences run (the step is then
        compute-bound: drafts cost more than they save), on again below it. Drafts left
        from a step that could not schedule their request are dropped first.
        """
        limit = self.config.disable_by_batch_size
        enabled = limit == 0 or scheduler.num_running < limit
        if enabled != self.is_enabled:
            logger.info(
                "speculative decoding %s: %d sequences running (disable_by_batch_size=%d)",
                "on" if enabled else "off",
                scheduler.num_running,
                limit,
            )
            self.is_enabled = enabled
        requests: list[Request] = []
        max_num_tokens: list[int] = []
        for request_id, state in states.items():
            request = scheduler.get_request(request_id)
            if request is None or request.status is not RequestStatus.RUNNING:
                continue
            if request.spec_token_ids:  # left from a step that did not schedule it
                request.spec_token_ids.clear()
            if not enabled:
                continue
            num_tokens = self._max_num_drafts(request)
            if num_tokens > 0 and can_speculate(state):
                requests.append(request)
                max_num_tokens.append(num_tokens)
        if not requests:
            return
        drafts = self.proposer.propose(requests, max_num_tokens)
        for request, draft, num_tokens in zip(requests, drafts, max_num_tokens, strict=True):
            request.spec_token_ids[:] = draft[:num_tokens]

    def _max_num_drafts(self, request: Request) -> int:
        """Drafts ``request`` can take now: none unless its only uncomputed token is a
        sampled one; never so many that accepting all would pass ``max_tokens`` or the
        context length."""
        if not request.output_token_ids or request.num_computed_tokens != request.num_tokens - 1:
            return 0
        room = self.max_model_len - request.num_tokens - 1
        if request.max_output_tokens is not None:
            room = min(room, request.max_output_tokens - request.num_output_tokens - 1)
        return min(self.config.num_speculative_tokens, room)

    def share_kv_blocks(self, num_blocks: int, runner: ModelRunner) -> int:
        """The target's KV blocks once the proposer's own cache (a draft model's) took its
        share of the bytes ``num_blocks`` target blocks would use."""
        left = self.proposer.take_kv_blocks(num_blocks, runner.bytes_per_block())
        if left < 1:
            raise ValueError("no KV-cache room left for the target model after the draft's")
        return left

    def record(self, verified: Mapping[str, VerifiedDrafts]) -> None:
        """Count a step's verified drafts."""
        if verified:
            self.metrics.record(verified.values())

    def remove_request(self, request_id: str) -> None:
        self.proposer.remove_request(request_id)

    def stats(self) -> SpecDecodeStats:
        return self.metrics.stats()
