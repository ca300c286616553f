"""When a step fails: find the request behind it, fail that one alone, keep serving.

A step that raises (a sampler that cannot build a tensor from one request's parameters,
a kernel that rejects one request's inputs, ...) says only that *some* request of its batch
cannot be served. The engine drops the step, and the one in flight with it, and sends their
requests back to wait: they recompute, as after a preemption, and no token they had not
delivered is lost. Their API requests become *suspects*, and until the failure is
explained the engine runs step by step (no overlap), alternating two kinds of step:

* an isolation step: one suspect alone (with its parallel-sampling siblings). Once it has
  sampled a token in such a step it is cleared; if the step fails, it is *accused*;
* a step of the running requests that are not under suspicion, so their streams go on.
  Requests still waiting are admitted once the isolation is over.

An accusation is checked before it is acted on: a *canary* (prompt ``[0]``, one greedy
token) runs alone. If it passes, the engine works and the accused requests are the cause:
each finishes with an error of its own (``finish_reason="error"`` and
``RequestOutput.error``; the server answers 500 for it). If the canary fails too, the
engine cannot go on (a broken device fails everything). The engine also gives up when
batched steps keep failing and no culprit is found (:data:`MAX_UNEXPLAINED_FAILURES`):
then batching itself is broken.

Failures outside the model's work (scheduling, bookkeeping) are not caught: the state may
be inconsistent there, so they end the engine as before.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from kvplane.sampling.params import SamplingParams
from kvplane.scheduler.output import SchedulerOutput
from kvplane.scheduler.request import Request, RequestStatus

if TYPE_CHECKING:
    from kvplane.engine.llm_engine import LLMEngine

logger = logging.getLogger(__name__)

#: Failed steps of several requests in a row, with no culprit found between them, after
#: which the engine gives up. Reset by a batched step that succeeds or a conviction.
MAX_UNEXPLAINED_FAILURES = 3

#: Request ids of canaries start with this.
CANARY_PREFIX = "kvplane-canary-"

# The canary's prompt: the shortest one every model accepts.
_CANARY_PROMPT = [0]


class UnrecoverableEngineError(RuntimeError):
    """The engine cannot go on: the canary failed, or batched steps keep failing."""


def request_id_of(sequence: Request) -> str:
    """The API request a sequence belongs to (children of ``n > 1`` carry their parent's)."""
    return sequence.parent_id or sequence.request_id


class FaultIsolation:
    """Suspects, accused requests and the canary, from a failed step to its verdict.

    Owned by :class:`~kvplane.engine.llm_engine.LLMEngine` and called on its thread only:
    :meth:`schedule` instead of ``Scheduler.schedule``, :meth:`step_failed` when the
    model's work for a step raises, :meth:`step_succeeded` after each step whose tokens
    came back. It acts on the engine through ``add_request``, ``abort_request`` and
    ``fail_request``, and on the scheduler through ``requeue``.
    """

    def __init__(self, engine: LLMEngine) -> None:
        self._engine = engine
        self._suspect_ids: dict[str, None] = {}  # API request ids, in the order they failed
        self._accused: dict[str, BaseException] = {}  # failed alone, awaiting the canary
        self._canary_id: str | None = None
        self._isolate_next = True  # isolation steps alternate with steps of the others
        self._num_unexplained_failures = 0
        #: Steps that failed since the engine started (for logs and tests).
        self.num_failed_steps = 0

    @property
    def is_active(self) -> bool:
        """Whether a failure is being isolated (the engine then runs step by step)."""
        return bool(self._suspect_ids or self._accused or self._canary_id)

    def schedule(self) -> SchedulerOutput:
        """This step's work: everything when no failure is being isolated; else, in turn,
        the next suspect alone or the running requests above suspicion (the other when
        one has nothing to run)."""
        scheduler = self._engine.scheduler
        if not self.is_active:
            return scheduler.schedule()
        target = self._next_target()
        turns: list[Callable[[Request], bool]] = [self._is_unsuspected]
        if target is not None:
            turns.insert(0 if self._isolate_next else 1, lambda r: request_id_of(r) == target)
        self._isolate_next = not self._isolate_next
        for is_eligible in turns:
            output = scheduler.schedule(is_eligible)
            if not output.is_empty:
                break
        return output

    def step_failed(self, error: Exception, failed: Sequence[SchedulerOutput]) -> None:
        """Undo the ``failed`` steps (dropped, in flight or just launched) and suspect or
        accuse their requests. Raises :class:`UnrecoverableEngineError` (from ``error``)
        when the engine cannot go on."""
        self.num_failed_steps += 1
        sequences = _sequences_of(failed)
        for sequence in sequences:
            sequence.drop_placeholders()
            self._engine.scheduler.requeue(sequence.request_id)
        request_ids = sorted({request_id_of(s) for s in sequences if not s.is_finished})
        if len(request_ids) == 1:
            self._accuse(request_ids[0], error)
        else:
            self._suspect(request_ids, error)

    def step_succeeded(self, output: SchedulerOutput) -> None:
        """Clear the suspects that sampled in ``output``; convict the accused if it was
        the canary's step."""
        if self._num_unexplained_failures:
            request_ids = {request_id_of(sequence) for sequence in _sequences_of([output])}
            if len(request_ids) > 1:
                self._num_unexplained_failures = 0  # batching works
        if not self.is_active:
            return
        for scheduled in output.scheduled:
            if scheduled.is_sampling:
                self._suspect_ids.pop(request_id_of(scheduled.request), None)
                if scheduled.request.request_id == self._canary_id:
                    self._convict()

    # -- internals ------------------------------------------------------------------------

    def _next_target(self) -> str | None:
        """The canary, else the first suspect still unfinished (forgetting finished ones)."""
        if self._canary_id is not None and not self._is_live(self._canary_id):
            self._canary_id = None  # aborted from outside: the accused still need one
            self._add_canary()
        if self._canary_id is not None:
            return self._canary_id
        for request_id in list(self._suspect_ids):
            if self._is_live(request_id):
                return request_id
            del self._suspect_ids[request_id]  # finished or aborted meanwhile
        return None

    def _is_unsuspected(self, sequence: Request) -> bool:
        request_id = request_id_of(sequence)
        return (
            sequence.status is RequestStatus.RUNNING
            and request_id not in self._suspect_ids
            and request_id not in self._accused
            and request_id != self._canary_id
        )

    def _is_live(self, request_id: str) -> bool:
        return bool(self._engine.output_processor.sequence_ids(request_id))

    def _suspect(self, request_ids: Iterable[str], error: Exception) -> None:
        self._num_unexplained_failures += 1
        if self._num_unexplained_failures >= MAX_UNEXPLAINED_FAILURES:
            raise UnrecoverableEngineError(
                f"{self._num_unexplained_failures} steps of several requests failed with no "
                f"culprit found; the last error: {error!r}"
            ) from error
        self._suspect_ids.update(dict.fromkeys(request_ids))
        logger.error(
            "a step failed (%r); running its %d requests one at a time to find the cause",
            error,
            len(self._suspect_ids),
            exc_info=error,
        )

    def _accuse(self, request_id: str, error: Exception) -> None:
        if request_id == self._canary_id:
            raise UnrecoverableEngineError(
                f"a step fails even for a one-token canary: {error!r}"
            ) from error
        logger.error(
            "request %s failed alone (%r); checking the engine with a canary", request_id, error
        )
        self._suspect_ids.pop(request_id, None)
        self._accused[request_id] = error
        if self._canary_id is None:
            self._add_canary()

    def _add_canary(self) -> None:
        """Queue a canary if an accusation awaits one."""
        if not self._accused:
            return
        self._canary_id = CANARY_PREFIX + uuid.uuid4().hex
        params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
        self._engine.add_request(self._canary_id, _CANARY_PROMPT, params, final_only=True)

    def _convict(self) -> None:
        """The canary passed: the engine works, so the accused requests are the cause."""
        assert self._canary_id is not None
        self._engine.abort_request(self._canary_id)  # it has done its job: no output
        self._canary_id = None
        self._num_unexplained_failures = 0
        accused, self._accused = self._accused, {}
        for request_id, error in accused.items():
            self._engine.fail_request(request_id, error)


def _sequences_of(outputs: Iterable[SchedulerOutput]) -> list[Request]:
    """Every sequence the steps computed or sampled (forked children included)."""
    sequences: dict[Request, None] = {}  # ordered, by identity
    for output in outputs:
        sequences.update(dict.fromkeys(scheduled.request for scheduled in output.scheduled))
        sequences.update(dict.fromkeys(forked.child for forked in output.forked))
    return list(sequences)
