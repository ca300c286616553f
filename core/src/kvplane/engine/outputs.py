"""What the engine returns: vLLM-shaped request and completion outputs."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from kvplane.sampling.sampler import SampleLogprobs


@dataclass(slots=True)
class CompletionOutput:
    """One of a request's ``n`` completions: cumulative so far, or what is new since the
    request's previous output (``RequestOutputKind.DELTA``; ``cumulative_logprob`` is
    still the sum so far)."""

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


def accumulate(previous: RequestOutput, delta: RequestOutput) -> RequestOutput:
    """The cumulative output after ``delta`` (a ``DELTA`` output of the same request):
    new lists, so that outputs already handed out keep their contents."""
    completions = []
    for old, new in zip(previous.outputs, delta.outputs, strict=True):
        logprobs = None
        if new.logprobs is not None:
            logprobs = [*(old.logprobs or ()), *new.logprobs]
        completions.append(
            replace(
                new,
                text=old.text + new.text,
                token_ids=[*old.token_ids, *new.token_ids],
                logprobs=logprobs,
            )
        )
    prompt_logprobs = delta.prompt_logprobs
    return replace(
        delta,
        prompt=previous.prompt,
        prompt_token_ids=previous.prompt_token_ids,
        prompt_logprobs=previous.prompt_logprobs if prompt_logprobs is None else prompt_logprobs,
        outputs=completions,
    )
