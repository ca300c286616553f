"""Pieces both generation endpoints use: starting a run, SSE framing, usage, logprob values."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from kvplane.engine.outputs import RequestOutput
from kvplane.server.errors import from_exception
from kvplane.server.params import check_token_ids
from kvplane.server.runner import ClientDisconnected, RequestRun, until_disconnected

#: Status logged for a request whose client left before the answer (nginx's convention).
CLIENT_CLOSED = 499

#: The last event of every stream.
DONE = "data: [DONE]\n\n"

# OpenAI clients expect finite numbers; JSON has no -Infinity.
_MIN_LOGPROB = -9999.0


class SSEResponse(StreamingResponse):
    """A ``text/event-stream`` whose generator is always closed when the response ends,
    disconnect included, so the generator's ``finally`` aborts what still runs."""

    media_type = "text/event-stream"

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]


def sse(payload: dict[str, Any]) -> str:
    """One server-sent event carrying ``payload`` as JSON."""
    return f"data: {json.dumps(payload, ensure_ascii=False, allow_nan=False)}\n\n"


def sse_error(error: BaseException) -> str:
    """The event reporting a failure in the middle of a stream (OpenAI SDKs raise it)."""
    return sse(from_exception(error).body())


async def start_run(run: RequestRun, request: Request) -> Response | None:
    """Start ``run``; None when it started, else the response to give instead.

    Token ids outside the vocabulary are a 400 naming the field; errors the engine
    reports on admission propagate (mapped to 400/503/500 by the error handlers); a
    client that leaves meanwhile gets its requests aborted.
    """
    vocab_size = run.engine.model_config.hf_config.vocab_size
    check_token_ids(run.prompts, run.params, vocab_size)
    try:
        await until_disconnected(request, run.start())
    except ClientDisconnected:
        await run.close()
        return Response(status_code=CLIENT_CLOSED)
    except BaseException:
        await run.close()
        raise
    return None


async def collect(run: RequestRun, num_prompts: int) -> list[RequestOutput]:
    """Every prompt's final output, in prompt order."""
    finals: list[RequestOutput | None] = [None] * num_prompts
    async for index, output in run:
        finals[index] = output
    assert all(output is not None for output in finals)
    return finals  # type: ignore[return-value]


async def run_to_completion(run: RequestRun, request: Request) -> list[RequestOutput] | Response:
    """The final outputs, or a 499 response if the client left (its requests aborted)."""
    try:
        return await until_disconnected(request, collect(run, len(run.prompts)))
    except ClientDisconnected:
        return Response(status_code=CLIENT_CLOSED)
    finally:
        await run.close()


def api_finish_reason(reason: str | None) -> str | None:
    """``finish_reason`` as clients get it: OpenAI's values only. The engine's ``"abort"``
    (a request cut short by shutdown; a client that left sees nothing) becomes
    ``"length"``: the output stopped before it was complete, as when it runs out of
    tokens, and typed clients (the openai SDKs) accept it."""
    return "length" if reason == "abort" else reason


def usage(
    num_prompt_tokens: int, num_completion_tokens: int, num_cached_tokens: int | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "prompt_tokens": num_prompt_tokens,
        "completion_tokens": num_completion_tokens,
        "total_tokens": num_prompt_tokens + num_completion_tokens,
    }
    if num_cached_tokens is not None:
        body["prompt_tokens_details"] = {"cached_tokens": num_cached_tokens}
    return body


def usage_of(outputs: Iterable[RequestOutput | None]) -> dict[str, Any]:
    """Usage summed over prompts (every prompt counted once, every completion's tokens)."""
    present = [output for output in outputs if output is not None]
    return usage(
        sum(len(output.prompt_token_ids) for output in present),
        sum(len(c.token_ids) for output in present for c in output.outputs),
        sum(output.num_cached_tokens for output in present),
    )


def usage_of_run(run: RequestRun) -> dict[str, Any]:
    """Usage of a run's outputs so far (streams, whose outputs are deltas)."""
    return usage(*run.token_counts())


def finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) and logprob > _MIN_LOGPROB else _MIN_LOGPROB


def now() -> int:
    return int(time.time())
