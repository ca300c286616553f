"""The offline API: ``LLM(...).generate(...)`` and ``.chat(...)``, shaped like vLLM's."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, cast

from kvplane.config import EngineConfig
from kvplane.engine.llm_engine import LLMEngine, PromptType
from kvplane.engine.outputs import RequestOutput
from kvplane.sampling.params import SamplingParams

#: A chat: a list of ``{"role": ..., "content": ...}`` messages.
Conversation = Sequence[Mapping[str, Any]]


class LLM:
    """Batch generation over a list of prompts.

    ``LLM(model=None)`` serves the embedded default model (SmolLM2-135M-Instruct). Every
    :class:`~kvplane.config.EngineConfig` option is a keyword argument.
    """

    def __init__(self, model: str | None = None, **engine_options: Any) -> None:
        self.engine = LLMEngine(EngineConfig.from_kwargs(model=model, **engine_options))
        self._request_counter = itertools.count()

    @classmethod
    def from_config(cls, config: EngineConfig) -> LLM:
        """An LLM for a ready-made :class:`EngineConfig`."""
        llm = cls.__new__(cls)
        llm.engine = LLMEngine(config)
        llm._request_counter = itertools.count()
        return llm

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """A new :class:`SamplingParams` with the model's recommended sampling (the
        ``generation_config`` option; kvplane's defaults where it recommends none).

        :meth:`generate` and :meth:`chat` use it when given no ``sampling_params``; to
        change one field and keep the others, change it on the returned copy.
        """
        return self.engine.model_config.sampling_defaults.sampling_params()

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        priority: Sequence[int] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in the order of ``prompts``.

        Without ``sampling_params`` each prompt gets :meth:`get_default_sampling_params`
        (the model's recommended sampling); given ones apply as they are, as in vLLM.
        ``use_tqdm`` shows a progress bar of output tokens (and finished requests).
        """
        prompt_list = _as_prompt_list(prompts)
        if sampling_params is None:
            sampling_params = [self.get_default_sampling_params() for _ in prompt_list]
        params_list = _broadcast(sampling_params, len(prompt_list), "sampling_params")
        priorities = list(priority) if priority is not None else [0] * len(prompt_list)
        if len(priorities) != len(prompt_list):
            raise ValueError("priority must have one entry per prompt")
        entries = list(zip(prompt_list, params_list, priorities, strict=True))
        intake = _RequestIntake(self.engine, entries, self._request_counter)
        try:
            return self._run_to_completion(intake, params_list, use_tqdm)
        except BaseException:
            self.engine.abort_request(intake.request_ids)
            raise

    def chat(
        self,
        messages: Conversation | Sequence[Conversation],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        add_generation_prompt: bool = True,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to each conversation, then :meth:`generate`."""
        is_single = bool(messages) and isinstance(messages[0], Mapping)
        conversations = [messages] if is_single else list(messages)  # type: ignore[list-item]
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            raise ValueError("chat() needs a tokenizer; this engine has skip_tokenizer_init set")
        prompts: list[PromptType] = []
        for conversation in conversations:
            token_ids = tokenizer.apply_chat_template(
                list(conversation),
                tools=list(tools) if tools else None,
                add_generation_prompt=add_generation_prompt,
                tokenize=True,
                **dict(chat_template_kwargs or {}),
            )
            if isinstance(token_ids, Mapping):  # transformers 5 returns a BatchEncoding
                token_ids = token_ids["input_ids"]
            prompts.append({"prompt_token_ids": list(token_ids)})
        return self.generate(prompts, sampling_params)

    def _run_to_completion(
        self, intake: _RequestIntake, params_list: Sequence[SamplingParams], use_tqdm: bool
    ) -> list[RequestOutput]:
        request_ids = intake.request_ids
        pending: set[str] = set()
        finished: dict[str, RequestOutput] = {}
        progress = _TokenProgress(self.engine, params_list, len(params_list)) if use_tqdm else None
        try:
            while True:
                intake.add_needed(pending)
                if not pending:
                    break
                for output in self.engine.step():
                    if output.finished and output.request_id in pending:
                        finished[output.request_id] = output
                        pending.discard(output.request_id)
                if progress is not None:
                    progress.update(len(finished))
        finally:
            if progress is not None:
                progress.close()
        return [finished[request_id] for request_id in request_ids]


class _RequestIntake:
    """Feeds ``generate``'s requests to the engine as its steps need them.

    Queuing hundreds of long prompts (tokenizing, checking, building each request's
    state) is host work during which the device would idle, so only enough go in before
    the first step to fill it, and more before each later step, while the device runs
    the one launched before (overlapped steps). The engine always holds at least
    ``BACKLOG_STEPS`` steps' worth of unscheduled prompt tokens, so every step is
    scheduled from the same queue as if all had been queued at once. With priorities
    that differ, all requests go in at once: a late high-priority one must not be
    admitted after the others. A prompt that cannot be served still raises before
    ``generate`` returns, and the caller aborts the requests already queued.
    """

    #: Steps' worth of prompt tokens kept queued ahead of the scheduler.
    BACKLOG_STEPS = 2

    def __init__(
        self,
        engine: LLMEngine,
        entries: list[tuple[PromptType, SamplingParams, int]],
        request_counter: Iterator[int],
    ) -> None:
        self._engine = engine
        self._entries = entries
        self._request_counter = request_counter
        self._next = 0
        self.request_ids: list[str] = []
        all_at_once = len({priority for _, _, priority in entries}) > 1
        budget = engine.config.batch_limits().max_num_batched_tokens
        self._backlog_tokens = None if all_at_once else self.BACKLOG_STEPS * budget
        self._num_prompt_tokens = 0  # of the requests queued so far
        self._scheduled_start = engine.num_scheduled_tokens

    def add_needed(self, pending: set[str]) -> None:
        """Queue requests until the backlog is full (or none is left); their ids join
        ``pending``."""
        engine = self._engine
        # Scheduled tokens include decode tokens: the backlog estimate errs on the side
        # of queuing more.
        scheduled = engine.num_scheduled_tokens - self._scheduled_start
        while self._next < len(self._entries) and (
            self._backlog_tokens is None
            or self._num_prompt_tokens - scheduled < self._backlog_tokens
        ):
            prompt, params, priority = self._entries[self._next]
            request_id = str(next(self._request_counter))
            self._num_prompt_tokens += engine.add_request(
                request_id, prompt, params, priority=priority, final_only=True
            )
            self._next += 1
            self.request_ids.append(request_id)
            pending.add(request_id)


class _TokenProgress:
    """A tqdm bar of output tokens as they are produced, with finished requests beside.

    Its total is the sum of ``n * max_tokens`` (exact for benchmarks that ignore EOS, an
    upper bound otherwise; none when a request has no ``max_tokens``), so the rate reads
    as output tokens per second rather than jumping once per finished request.
    """

    def __init__(self, engine: LLMEngine, params_list: Sequence[SamplingParams], num_requests: int):
        from tqdm import tqdm

        limits = [p.max_tokens for p in params_list]
        total = None if None in limits else sum(p.n * (p.max_tokens or 0) for p in params_list)
        self._engine = engine
        self._start_count = engine.num_generated_tokens
        self._num_requests = num_requests
        self._bar = tqdm(total=total, desc="output tokens", unit="tok", dynamic_ncols=True)

    def update(self, num_finished: int) -> None:
        produced = self._engine.num_generated_tokens - self._start_count
        if produced > self._bar.n:
            self._bar.update(produced - self._bar.n)
            self._bar.set_postfix_str(f"requests {num_finished}/{self._num_requests}", False)

    def close(self) -> None:
        # Requests that stopped early leave the upper-bound total unreached: end at 100%.
        self._bar.total = self._bar.n
        self._bar.refresh()
        self._bar.close()


def _as_prompt_list(prompts: PromptType | Sequence[PromptType]) -> list[PromptType]:
    if isinstance(prompts, str | Mapping):
        return [prompts]
    prompt_list = list(prompts)
    if prompt_list and isinstance(prompt_list[0], int):
        return [cast("list[int]", prompt_list)]  # a single prompt given as token ids
    return cast("list[PromptType]", prompt_list)


def _broadcast(
    params: SamplingParams | Sequence[SamplingParams], count: int, name: str
) -> list[SamplingParams]:
    if isinstance(params, SamplingParams):
        return [params] * count
    params_list = list(params)
    if len(params_list) != count:
        raise ValueError(f"{name} has {len(params_list)} entries for {count} prompts")
    return params_list
