"""Request state: the tokens of one sequence and how far the model has computed them."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

#: Stands in ``output_token_ids`` for a token sampled on the device but not read back yet:
#: with overlapped steps the engine schedules the next step before it knows the token,
#: and the model runner takes the real id from the device (see ``LLMEngine``).
PLACEHOLDER_TOKEN_ID = -1


class RequestStatus(enum.Enum):
    """Where a request is in its life cycle.

    ``WAITING`` (queued, or a parallel-sampling child waiting to be forked) ->
    ``RUNNING`` (holds KV blocks) -> one of the ``FINISHED_*`` states. A running request
    whose blocks are taken back becomes ``PREEMPTED`` and waits again; it resumes by
    recomputing its tokens (most of them usually found in the prefix cache).
    """

    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    FINISHED_STOPPED = enum.auto()  # a stop token or stop string
    FINISHED_LENGTH = enum.auto()  # max_tokens or max_model_len reached
    FINISHED_ABORTED = enum.auto()  # cancelled by the client or the engine
    FINISHED_ERROR = enum.auto()  # the engine failed on it (see engine/fault_isolation.py)

    @property
    def is_finished(self) -> bool:
        return self in _FINISHED


_FINISHED = frozenset(
    {
        RequestStatus.FINISHED_STOPPED,
        RequestStatus.FINISHED_LENGTH,
        RequestStatus.FINISHED_ABORTED,
        RequestStatus.FINISHED_ERROR,
    }
)


@dataclass(slots=True, eq=False)
class Request:
    """One sequence: its prompt, the tokens sampled so far and its scheduling state.

    Compared and hashed by identity. The scheduler owns ``status``,
    ``num_computed_tokens``, ``num_cached_tokens`` and ``num_preemptions``; the engine
    appends sampled tokens only through :meth:`Scheduler.update_from_output`, which calls
    :meth:`append_output_token`. Not thread-safe: touch it from the engine loop only.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: Any  # opaque to the scheduler
    arrival_time: float
    priority: int = 0  # smaller is served first (vLLM convention)
    output_token_ids: list[int] = field(default_factory=list)
    # Tokens whose KV is in this request's blocks; catches up with num_tokens step by step.
    num_computed_tokens: int = 0
    # Prompt tokens found in the prefix cache on the first schedule.
    num_cached_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    num_preemptions: int = 0
    parent_id: str | None = None  # set on the children of a parallel-sampling (n > 1) request
    cache_salt: str | None = None  # mixed into the prefix-cache hash of the first block
    # The request finishes by length at this many output tokens (None: only max_model_len);
    # the scheduler does not schedule a request that has them all, counting placeholders.
    max_output_tokens: int | None = None
    # Draft tokens a proposer made for the next step (speculative decoding); the scheduler
    # takes them into that step's ScheduledRequest and clears them.
    spec_token_ids: list[int] = field(default_factory=list)
    _all_token_ids: list[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.prompt_token_ids = list(self.prompt_token_ids)
        self.output_token_ids = list(self.output_token_ids)
        self._all_token_ids = self.prompt_token_ids + self.output_token_ids

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt followed by outputs. The live list, not a copy: do not mutate it."""
        return self._all_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self._all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def append_output_token(self, token_id: int) -> None:
        """Record one sampled token (O(1); keeps ``all_token_ids`` in step)."""
        self.output_token_ids.append(token_id)
        self._all_token_ids.append(token_id)

    @property
    def has_placeholder(self) -> bool:
        """Whether the last token is still on the device (overlapped steps)."""
        return bool(self.output_token_ids) and self.output_token_ids[-1] == PLACEHOLDER_TOKEN_ID

    def resolve_placeholder(self, token_id: int) -> None:
        """Replace the trailing placeholder with the token it stood for."""
        if not self.has_placeholder:
            raise ValueError(f"request {self.request_id!r} has no placeholder token")
        self.output_token_ids[-1] = token_id
        self._all_token_ids[-1] = token_id

    def truncate_output(self, num_output_tokens: int) -> None:
        """Keep the first ``num_output_tokens`` outputs: a step that emits several tokens
        (speculative decoding) drops those after the one that stopped the request."""
        num_dropped = len(self.output_token_ids) - num_output_tokens
        if num_dropped > 0:
            del self.output_token_ids[num_output_tokens:]
            del self._all_token_ids[len(self._all_token_ids) - num_dropped :]

    def drop_placeholders(self) -> None:
        """Remove the trailing placeholders: their step was dropped (a failed step), so
        the tokens they stood for will never arrive."""
        while self.has_placeholder:
            self.output_token_ids.pop()
            self._all_token_ids.pop()
