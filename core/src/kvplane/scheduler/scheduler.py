"""Continuous batching with chunked prefill, prefix caching, preemption and forks.

There is no prefill phase and no decode phase: each step, every request's
``num_computed_tokens`` catches up with its ``num_tokens`` as far as the token budget
allows, so long prompts are spread over several steps alongside other requests' decodes.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence

from kvplane.kv_cache.block_manager import BlockManager
from kvplane.scheduler.checks import check_children, check_new
from kvplane.scheduler.config import SchedulerConfig
from kvplane.scheduler.output import (
    ForkedRequest,
    ScheduledRequest,
    SchedulerOutput,
    SchedulerStats,
)
from kvplane.scheduler.queue import RequestQueue, SortKey
from kvplane.scheduler.request import Request, RequestStatus


class Scheduler:
    """Decides, step by step, which tokens of which requests the model computes.

    Policy:

    * Running requests are served first, in (priority, arrival) order. When one cannot get
      blocks, the running request that comes last in that order (largest priority value,
      then latest arrival; possibly itself) is preempted: its blocks are freed and it
      waits again, to recompute later. Victims therefore never include a request already
      scheduled in the same step.
    * Then waiting requests, in (priority, preempted first, arrival) order, while token
      budget and seats remain. A request whose blocks cannot be had blocks those behind
      it (no overtaking, so large requests do not starve); nothing is admitted in a step
      that preempted.
    * A parallel-sampling family (parent plus children) takes ``1 + len(children)`` seats
      from admission on; the children are forked off the parent in its first sampling
      step.

    Driven by the engine loop only (one thread): ``schedule()``, run the model,
    ``update_from_output()``, then ``finish_request()`` for requests that hit a stop
    condition. The engine must finish a request once ``num_tokens`` reaches
    ``max_model_len``.
    """

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        if block_manager.block_size != config.block_size:
            raise ValueError(
                f"block manager uses block_size={block_manager.block_size}, the scheduler "
                f"config block_size={config.block_size}"
            )
        if block_manager.enable_prefix_caching != config.enable_prefix_caching:
            raise ValueError("block manager and scheduler config disagree on prefix caching")
        capacity = block_manager.num_blocks * block_manager.block_size
        if config.max_model_len > capacity:
            # Otherwise one sequence could outgrow the whole cache and never fit again.
            raise ValueError(
                f"max_model_len={config.max_model_len} exceeds the KV cache capacity of "
                f"{capacity} tokens ({block_manager.num_blocks} blocks of "
                f"{block_manager.block_size}); lower max_model_len or give the cache more "
                "memory"
            )
        self.config = config
        self.block_manager = block_manager
        self._requests: dict[str, Request] = {}  # every unfinished request
        self._running = RequestQueue()
        self._waiting = RequestQueue()
        self._children: dict[str, list[Request]] = {}  # parent id -> children not yet forked
        self._seqs: dict[str, int] = {}  # arrival-order tie-breaker
        self._next_seq = itertools.count()
        self.num_preemptions_total = 0

    # ---------------------------------------------------------------- requests in and out

    def add_request(self, request: Request, children: Sequence[Request] = ()) -> None:
        """Queue a new request; ``children`` are its parallel-sampling siblings (n > 1).

        Children must repeat the parent's prompt (and cache salt); they wait until the
        parent's first sampling step, in which they are forked (sharing its blocks) and
        listed in ``SchedulerOutput.forked``. If the parent finishes before that, they
        are queued as ordinary requests. ``child.parent_id`` is set to the parent's id.

        Raises ValueError for an empty prompt, a sequence longer than ``max_model_len``
        (which also bounds it to the KV cache capacity), a duplicate request id, a family
        larger than ``max_num_seqs`` or a request that is not fresh.
        """
        check_new(request, self._requests)
        if not request.prompt_token_ids:
            raise ValueError(f"request {request.request_id!r} has an empty prompt")
        if request.num_tokens > self.config.max_model_len:
            raise ValueError(
                f"request {request.request_id!r} has {request.num_tokens} tokens, more than "
                f"max_model_len={self.config.max_model_len}"
            )
        if children:
            check_children(request, children, self._requests, self.config.max_num_seqs)
        self._enqueue_new(request)
        if children:
            for child in children:
                child.parent_id = request.request_id
                self._requests[child.request_id] = child
                self._seqs[child.request_id] = next(self._next_seq)
            self._children[request.request_id] = list(children)

    def finish_request(self, request_id: str, status: RequestStatus) -> bool:
        """Finish a request in any state and free its blocks at once.

        Unforked children of a finished parent are queued as ordinary requests. Returns
        False (doing nothing) for an unknown or already finished id.
        """
        if not status.is_finished:
            raise ValueError(f"finish_request needs a FINISHED_* status, got {status}")
        request = self._requests.pop(request_id, None)
        if request is None:
            return False
        if request.status is RequestStatus.RUNNING:
            self._running.remove(request)
        elif not self._waiting.remove(request):
            self._drop_unforked_child(request)
        request.status = status
        self.block_manager.free(request)
        del self._seqs[request_id]
        for child in self._children.pop(request_id, ()):
            self._waiting.insert(self._waiting_key(child), child)
        return True

    def abort_request(self, request_id: str) -> bool:
        """``finish_request(request_id, FINISHED_ABORTED)``."""
        return self.finish_request(request_id, RequestStatus.FINISHED_ABORTED)

    # ---------------------------------------------------------------- the step

    def schedule(self, is_eligible: Callable[[Request], bool] | None = None) -> SchedulerOutput:
        """Pick this step's tokens, allocate their blocks, preempt and fork as needed.

        Mutates request state (status, ``num_computed_tokens`` of admitted and preempted
        requests) and the block tables; ``num_computed_tokens`` of scheduled requests
        advances only in :meth:`update_from_output`. ``is_eligible`` limits the step to
        the requests it accepts (the engine isolates a failing request this way); the
        others keep their place and blocks, though they can still be preempted.
        """
        budget = self.config.max_num_batched_tokens
        step = _Step()
        for request in self._running.snapshot():
            if budget == 0:
                break
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this step
            if is_eligible is not None and not is_eligible(request):
                continue
            # Draft tokens (speculative decoding) ride along where the budget allows.
            num_pending = request.num_tokens - request.num_computed_tokens
            num_new = min(num_pending + len(request.spec_token_ids), budget)
            if num_new == 0:
                continue  # waiting for a sampled token
            limit = request.max_output_tokens
            if limit is not None and request.num_output_tokens >= limit and num_new == 1:
                continue  # its last token is in flight: it will finish by length
            if not self._allocate_or_preempt(request, num_new, step):
                break  # preempted itself: it came last, nothing follows
            budget -= num_new
            self._schedule(request, num_new, step)

        while budget > 0 and not step.preempted and (candidate := self._waiting.first(is_eligible)):
            num_seats = 1 + len(self._children.get(candidate.request_id, ()))
            if self._num_seats_taken() + num_seats > self.config.max_num_seqs:
                break
            computed_block_ids, num_cached = self.block_manager.get_computed_blocks(candidate)
            num_new = min(candidate.num_tokens - num_cached, budget)
            candidate.num_computed_tokens = num_cached
            copies = self.block_manager.allocate_slots(candidate, num_new, computed_block_ids)
            if copies is None:
                candidate.num_computed_tokens = 0
                break
            self._waiting.remove(candidate)
            if candidate.num_preemptions == 0:
                candidate.num_cached_tokens = num_cached
            candidate.status = RequestStatus.RUNNING
            self._running.insert(self._running_key(candidate), candidate)
            step.copies.extend(copies)
            budget -= num_new
            self._schedule(candidate, num_new, step)

        return SchedulerOutput(
            scheduled=tuple(step.scheduled),
            forked=tuple(step.forked),
            block_copies=tuple(step.copies),
            preempted_request_ids=tuple(step.preempted),
            num_batched_tokens=self.config.max_num_batched_tokens - budget,
            block_table=self.block_manager.table_array.array,
        )

    def update_from_output(
        self,
        output: SchedulerOutput,
        sampled_token_ids: Mapping[str, int],
        accepted_token_ids: Mapping[str, Sequence[int]] | None = None,
    ) -> None:
        """Advance the scheduled requests after the model ran ``output``.

        ``sampled_token_ids`` maps request id to the token sampled for it: for scheduled
        requests with ``is_sampling`` and for forked children. ``accepted_token_ids``
        holds, for requests that had draft tokens, the leading drafts the engine kept
        (appended before the sampled token); the rejected ones are not computed tokens,
        and the blocks only they used are released. Requests finished since
        :meth:`schedule` are skipped. Newly full blocks enter the prefix cache. Stop
        conditions are the engine's job (it calls :meth:`finish_request` afterwards).
        Raises ValueError, changing nothing, for a stale output or a token for a request
        that was not sampling.
        """
        for scheduled in output.scheduled:
            request = scheduled.request
            if request.status is not RequestStatus.RUNNING:
                continue
            if request.num_computed_tokens != scheduled.start_position:
                raise ValueError(
                    f"stale scheduler output: request {request.request_id!r} has "
                    f"{request.num_computed_tokens} computed tokens, the output starts at "
                    f"{scheduled.start_position}"
                )
            if not scheduled.is_sampling and request.request_id in sampled_token_ids:
                raise ValueError(f"request {request.request_id!r} was not sampling this step")
        accepted = accepted_token_ids or {}
        self.commit(output, accepted)
        for scheduled in output.scheduled:
            request = scheduled.request
            if request.status is RequestStatus.RUNNING:
                for token_id in accepted.get(request.request_id, ()):
                    request.append_output_token(token_id)
                self._append_sampled(request, sampled_token_ids)
                if scheduled.spec_token_ids:
                    self.block_manager.trim(request, request.num_tokens)
        for forked in output.forked:
            if forked.child.status is RequestStatus.RUNNING:
                self._append_sampled(forked.child, sampled_token_ids)
        self.cache_blocks(output)

    def requeue(self, request_id: str) -> None:
        """Preempt a running request outside a step: it frees its blocks and waits to
        recompute. The engine does this to the requests of a step that failed."""
        request = self._requests.get(request_id)
        if request is not None and request.status is RequestStatus.RUNNING:
            self._preempt(request, _Step())

    def commit(
        self, output: SchedulerOutput, accepted_token_ids: Mapping[str, Sequence[int]] | None = None
    ) -> None:
        """Advance the scheduled requests' computed tokens (of draft tokens, only the
        accepted ones).

        Part of :meth:`update_from_output`; with overlapped steps the engine calls it alone
        as soon as the step is launched (the next step is scheduled before this one's
        tokens are back), appends placeholders, and calls :meth:`cache_blocks` once the
        tokens are known (such steps carry no draft tokens)."""
        for scheduled in output.scheduled:
            request = scheduled.request
            if request.status is RequestStatus.RUNNING:
                accepted = (accepted_token_ids or {}).get(request.request_id, ())
                num_rejected = len(scheduled.spec_token_ids) - len(accepted)
                request.num_computed_tokens += scheduled.num_new_tokens - num_rejected

    def cache_blocks(self, output: SchedulerOutput) -> None:
        """Enter the newly full blocks of ``output``'s requests (and forked children) into
        the prefix cache, once their tokens are known."""
        requests = [s.request for s in output.scheduled] + [f.child for f in output.forked]
        for request in requests:
            if request.status is RequestStatus.RUNNING:
                self.block_manager.cache_full_blocks(request)

    # ---------------------------------------------------------------- queries

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        """Queued requests plus children waiting to be forked."""
        return len(self._waiting) + sum(len(c) for c in self._children.values())

    def get_request(self, request_id: str) -> Request | None:
        """The unfinished request with this id, or None."""
        return self._requests.get(request_id)

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_running=self.num_running,
            num_waiting=self.num_waiting,
            kv_cache_usage=self.block_manager.usage,
            prefix_cache_queries=self.block_manager.prefix_cache_queries,
            prefix_cache_hits=self.block_manager.prefix_cache_hits,
            num_preemptions_total=self.num_preemptions_total,
        )

    # ---------------------------------------------------------------- internals

    def _allocate_or_preempt(self, request: Request, num_new: int, step: _Step) -> bool:
        """Allocate blocks for a running request, preempting from the back until it fits.

        Returns False if ``request`` itself had to be preempted.
        """
        while True:
            copies = self.block_manager.allocate_slots(request, num_new)
            if copies is not None:
                step.copies.extend(copies)
                return True
            victim = self._running.last()
            assert victim is not None  # `request` itself is running
            self._preempt(victim, step)
            if victim is request:
                return False

    def _preempt(self, request: Request, step: _Step) -> None:
        self._running.remove(request)
        self.block_manager.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.spec_token_ids.clear()
        request.num_preemptions += 1
        self.num_preemptions_total += 1
        self._waiting.insert(self._waiting_key(request), request)
        step.preempted.append(request.request_id)
        # A child forked earlier in this step is un-forked: it will prefill on its own.
        step.forked = [f for f in step.forked if f.child is not request]

    def _schedule(self, request: Request, num_new: int, step: _Step) -> None:
        """Record a request whose blocks are allocated; fork its children if it samples."""
        start = request.num_computed_tokens
        num_spec = max(0, start + num_new - request.num_tokens)
        spec_token_ids = tuple(request.spec_token_ids[:num_spec])
        request.spec_token_ids.clear()  # taken: the next step gets fresh drafts
        is_sampling = start + num_new - num_spec == request.num_tokens
        manager = self.block_manager
        num_blocks = manager.num_table_blocks(request.request_id)
        row = manager.table_array.row_of(request.request_id)
        step.scheduled.append(
            ScheduledRequest(request, num_new, start, num_blocks, is_sampling, row, spec_token_ids)
        )
        if is_sampling:
            for child in self._children.pop(request.request_id, ()):
                self.block_manager.fork(request, child)
                child.num_computed_tokens = request.num_tokens
                child.status = RequestStatus.RUNNING
                self._running.insert(self._running_key(child), child)
                step.forked.append(ForkedRequest(child, request.request_id))

    def _append_sampled(self, request: Request, sampled_token_ids: Mapping[str, int]) -> None:
        token_id = sampled_token_ids.get(request.request_id)
        if token_id is not None:
            request.append_output_token(token_id)

    def _num_seats_taken(self) -> int:
        """Running requests plus the seats reserved for their unforked children."""
        reserved = sum(
            len(children)
            for parent_id, children in self._children.items()
            if self._requests[parent_id].status is RequestStatus.RUNNING
        )
        return len(self._running) + reserved

    def _running_key(self, request: Request) -> SortKey:
        return (request.priority, request.arrival_time, self._seqs[request.request_id])

    def _waiting_key(self, request: Request) -> SortKey:
        # Preempted requests go to the front of their priority class.
        rank = 0 if request.status is RequestStatus.PREEMPTED else 1
        return (request.priority, rank, request.arrival_time, self._seqs[request.request_id])

    def _enqueue_new(self, request: Request) -> None:
        self._requests[request.request_id] = request
        self._seqs[request.request_id] = next(self._next_seq)
        self._waiting.insert(self._waiting_key(request), request)

    def _drop_unforked_child(self, request: Request) -> None:
        parent_id = request.parent_id
        if parent_id is None:
            return
        siblings = self._children.get(parent_id)
        if siblings is None:
            return
        siblings[:] = [child for child in siblings if child is not request]
        if not siblings:
            del self._children[parent_id]


class _Step:
    """What one :meth:`Scheduler.schedule` call has decided so far."""

    __slots__ = ("copies", "forked", "preempted", "scheduled")

    def __init__(self) -> None:
        self.scheduled: list[ScheduledRequest] = []
        self.forked: list[ForkedRequest] = []
        self.copies: list[tuple[int, int]] = []
        self.preempted: list[str] = []
