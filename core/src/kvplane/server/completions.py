"""``POST /v1/completions``: text or token-id prompts, one or many, streamed or not."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from kvplane.engine.outputs import CompletionOutput, RequestOutput
from kvplane.sampling.logprobs import SampleLogprobs
from kvplane.server.errors import bad_request
from kvplane.server.params import build_sampling_params
from kvplane.server.protocol import CompletionRequest
from kvplane.server.responses import (
    DONE,
    SSEResponse,
    api_finish_reason,
    finite,
    now,
    run_to_completion,
    sse,
    sse_error,
    start_run,
    usage_of,
    usage_of_run,
)
from kvplane.server.runner import RequestRun
from kvplane.server.state import ServerState


async def create_completion(
    state: ServerState, body: CompletionRequest, request: Request
) -> Response:
    state.check_model(body.model)
    if body.suffix:
        raise bad_request("suffix is not supported", "suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise bad_request("best_of is not supported; use n", "best_of")
    if body.echo and state.tokenizer is None:
        raise bad_request("echo needs a tokenizer, and this model has none", "echo")
    prompts = await _prompts(state, body)
    for token_ids in prompts:
        state.check_prompt(token_ids, "prompt")
        state.check_max_tokens(token_ids, body.max_tokens, "max_tokens")
    prompt_logprobs = body.prompt_logprobs
    if body.echo and body.logprobs is not None:
        prompt_logprobs = body.logprobs  # echoed prompt tokens carry logprobs too
    params = build_sampling_params(
        body,
        max_tokens=body.max_tokens,
        logprobs=body.logprobs,
        prompt_logprobs=prompt_logprobs,
        max_logprobs=state.settings.max_logprobs,
        max_num_seqs=state.max_num_seqs,
        defaults=state.sampling_defaults,
        detokenize=state.tokenizer is not None,
    )
    run = state.new_run("cmpl", prompts, params, body.priority)
    response = await start_run(run, request)
    if response is not None:
        return response
    try:  # after the engine accepted the token ids: out-of-vocabulary ones are its 400
        prompt_texts = await _echoed_texts(state, body, prompts)
    except BaseException:
        await run.close()
        raise
    formatter = _Formatter(state, body, run, prompt_texts)
    if body.stream:
        return SSEResponse(formatter.stream())
    finals = await run_to_completion(run, request)
    if isinstance(finals, Response):
        return finals
    return JSONResponse(formatter.response(finals))


async def _prompts(state: ServerState, body: CompletionRequest) -> list[list[int]]:
    prompt = body.prompt
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise bad_request("prompt must not be empty", "prompt")
    if isinstance(prompt[0], int):
        return [list(prompt)]  # type: ignore[arg-type]
    if isinstance(prompt[0], list):
        return [list(token_ids) for token_ids in prompt]  # type: ignore[union-attr]
    pool = state.require_tokenizer_pool()
    texts: list[str] = prompt  # type: ignore[assignment]
    for text in texts:
        pool.check_length(text, "prompt")  # every text, before any is tokenized
    encodes = (pool.encode(text, body.add_special_tokens, "prompt") for text in texts)
    return list(await asyncio.gather(*encodes))


async def _echoed_texts(
    state: ServerState, body: CompletionRequest, prompts: list[list[int]]
) -> list[str]:
    """Each prompt's text when echoing (token-id prompts are decoded), else nothing."""
    if not body.echo:
        return []
    if isinstance(body.prompt, str):
        return [body.prompt]
    if isinstance(body.prompt[0], str):
        return list(body.prompt)  # type: ignore[arg-type]
    pool = state.require_tokenizer_pool()
    return list(await asyncio.gather(*(pool.decode(token_ids) for token_ids in prompts)))


class _Formatter:
    """Builds the response body, or the stream of chunks, of one completion request."""

    def __init__(
        self, state: ServerState, body: CompletionRequest, run: RequestRun, prompt_texts: list[str]
    ) -> None:
        self.state = state
        self.body = body
        self.run = run
        self.created = now()
        self.prompt_texts = prompt_texts  # one per prompt when echoing

    def response(self, finals: Sequence[RequestOutput]) -> dict[str, Any]:
        choices = []
        for prompt_index, output in enumerate(finals):
            for completion in output.outputs:
                text, logprobs = self._choice_content(
                    prompt_index, output.prompt_logprobs, completion, 0
                )
                choices.append(
                    {
                        "index": prompt_index * self.body.n + completion.index,
                        "text": text,
                        "logprobs": logprobs,
                        "finish_reason": api_finish_reason(completion.finish_reason),
                        "stop_reason": completion.stop_reason,
                    }
                )
        return self._envelope(choices) | {"usage": usage_of(finals)}

    async def stream(self) -> AsyncIterator[str]:
        """The chunks of a stream; the run's outputs are deltas."""
        num_chars_sent: dict[int, int] = {}  # choice -> characters sent (logprobs' offsets)
        finished: set[int] = set()
        # Each prompt's logprobs come with its first output only.
        prompt_logprobs: dict[int, list[SampleLogprobs | None] | None] = {}
        try:
            async for prompt_index, output in self.run:
                if output.prompt_logprobs is not None:
                    prompt_logprobs[prompt_index] = output.prompt_logprobs
                for completion in output.outputs:
                    choice = prompt_index * self.body.n + completion.index
                    is_new = bool(completion.token_ids or completion.text)
                    if choice in finished or not (is_new or completion.finished):
                        continue
                    started = choice in num_chars_sent
                    text, logprobs = self._choice_content(
                        prompt_index,
                        prompt_logprobs.get(prompt_index),
                        completion,
                        num_chars_sent.get(choice, 0),
                        started,
                    )
                    if completion.finished:
                        finished.add(choice)
                    num_chars_sent[choice] = num_chars_sent.get(choice, 0) + len(completion.text)
                    chunk = self._envelope(
                        [
                            {
                                "index": choice,
                                "text": text,
                                "logprobs": logprobs,
                                "finish_reason": api_finish_reason(completion.finish_reason),
                                "stop_reason": completion.stop_reason,
                            }
                        ]
                    )
                    if self._continuous_usage:
                        chunk["usage"] = usage_of_run(self.run)
                    yield sse(chunk)
            if self.body.include_usage:
                yield sse(self._envelope([]) | {"usage": usage_of_run(self.run)})
        except Exception as error:
            yield sse_error(error)
        finally:
            await self.run.close()
        yield DONE

    @property
    def _continuous_usage(self) -> bool:
        options = self.body.stream_options
        return options is not None and options.include_usage and options.continuous_usage_stats

    def _envelope(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.run.request_id,
            "object": "text_completion",
            "created": self.created,
            "model": self.state.model_name,
            "choices": choices,
        }

    def _choice_content(
        self,
        prompt_index: int,
        prompt_logprobs: list[SampleLogprobs | None] | None,
        completion: CompletionOutput,
        num_chars_before: int,
        started: bool = False,
    ) -> tuple[str, dict[str, Any] | None]:
        """Text and logprobs of ``completion`` (whole, or a stream's delta that follows
        ``num_chars_before`` characters); the first piece of a choice starts with the
        prompt when echoing."""
        text = completion.text
        token_ids = completion.token_ids
        entries: list[SampleLogprobs | None] = list(completion.logprobs or [])
        echo = self.body.echo and not started
        if echo:
            text = self._prompt_text(prompt_index) + text
        if self.body.logprobs is None:
            return text, None
        offset = len(self._prompt_text(prompt_index)) if self.body.echo else 0
        offset += num_chars_before
        if echo:
            prompt_token_ids = self.run.prompts[prompt_index]
            prompt_entries = list(prompt_logprobs or [None] * len(prompt_token_ids))
            token_ids = list(prompt_token_ids) + token_ids
            entries = prompt_entries + entries
            offset = 0
        return text, self._logprobs(token_ids, entries, offset)

    def _prompt_text(self, prompt_index: int) -> str:
        return self.prompt_texts[prompt_index]

    def _logprobs(
        self, token_ids: list[int], entries: list[SampleLogprobs | None], offset: int
    ) -> dict[str, Any]:
        """OpenAI's legacy completion logprobs: tokens, token_logprobs, top_logprobs,
        text_offset (the sampled token is listed among the top ones, as vLLM does)."""
        num_top = self.body.logprobs or 0
        tokens: list[str] = []
        token_logprobs: list[float | None] = []
        top_logprobs: list[dict[str, float] | None] = []
        text_offset: list[int] = []
        for token_id, entry in zip(token_ids, entries, strict=False):
            if entry is None or token_id not in entry:
                token = self.state.decode([token_id])
                token_logprobs.append(None)
                top_logprobs.append(None)
            else:
                chosen = entry[token_id]
                token = chosen.decoded_token or ""
                token_logprobs.append(finite(chosen.logprob))
                top_logprobs.append(
                    {
                        (lp.decoded_token or ""): finite(lp.logprob)
                        for tid, lp in entry.items()
                        if tid == token_id or (lp.rank is not None and lp.rank <= num_top)
                    }
                )
            tokens.append(token)
            text_offset.append(offset)
            offset += len(token)
        return {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs,
            "text_offset": text_offset,
        }
