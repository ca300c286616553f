"""What the engine returns: vLLM-shaped request and completion outputs."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvplane.sampling.sampler import SampleLogprobs


@dataclass(slots=True)
class CompletionOutput:
    """One of a request's ``n`` completions, cumulative so far."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[SampleLogprobs] | None
    # "stop", "length", "abort", "error" (see RequestOutput.error) or None while running
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # the stop token id or stop string that matched

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestOutput:
    """A request's prompt and its completions; ``finished`` once all completions are.

    ``error`` is set (``"ExceptionType: message"``) on the last output of a request the
    engine failed on while serving the others (see ``engine/fault_isolation.py``); its
    unfinished completions then end with ``finish_reason="error"``.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[SampleLogprobs | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None
