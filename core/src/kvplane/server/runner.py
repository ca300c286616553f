"""One API request on the engine: one engine request per prompt, their outputs merged.

A :class:`RequestRun` lives on the event-loop thread. ``await run.start()`` submits every
prompt and returns once each has produced its first output, so a request the engine
rejects (a schema that cannot compile, a token id outside the vocabulary...) raises here,
before a streaming response has sent its status line. Iterating then yields
``(prompt_index, RequestOutput)`` until every prompt has finished: each output as the
request's ``params.output_kind`` says (streams ask for ``DELTA``: what is new since the
prompt's previous output, so a step costs what it adds, not the output's length).
:meth:`RequestRun.token_counts` counts the tokens whatever the kind.

Leaving early (client gone, handler cancelled) and :meth:`RequestRun.close` abort the
engine requests still running; :meth:`RequestRun.cancel` (server shutdown) makes the
iteration end with ``finish_reason="abort"`` outputs so the response completes normally.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, MutableMapping
from typing import Any, TypeVar

from starlette.requests import Request

from kvplane.engine.async_llm import AsyncLLM
from kvplane.engine.outputs import CompletionOutput, RequestOutput
from kvplane.sampling.logprobs import SampleLogprobs
from kvplane.sampling.params import RequestOutputKind, SamplingParams
from kvplane.server.metrics import ServerMetrics

T = TypeVar("T")

# Queue items: (prompt index, output or the error that ended it); None means cancelled.
_Item = tuple[int, RequestOutput | BaseException] | None


class ClientDisconnected(Exception):
    """The client closed the connection before the response was ready."""


class RequestRun:
    """The engine requests of one API request (see the module docstring)."""

    def __init__(
        self,
        engine: AsyncLLM,
        metrics: ServerMetrics,
        registry: set[RequestRun],
        request_id: str,
        prompts: list[list[int]],
        params: SamplingParams,
        priority: int = 0,
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.registry = registry
        self.request_id = request_id
        self.prompts = prompts
        self.params = params
        self.priority = priority
        self.arrival = time.monotonic()
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._buffer: deque[_Item] = deque()
        self._tasks: list[asyncio.Task[None]] = []
        self._last: list[RequestOutput | None] = [None] * len(prompts)
        # Output tokens so far of each prompt's completions (deltas add up here).
        self._num_output_tokens: list[list[int]] = [[0] * params.n for _ in prompts]
        self._first_token_time: list[float | None] = [None] * len(prompts)
        self._finished = [False] * len(prompts)
        self._closed = False

    def engine_request_id(self, index: int) -> str:
        return f"{self.request_id}-{index}"

    async def start(self) -> None:
        """Submit every prompt; return when each has a first output. Raises the first
        error any prompt met (after aborting the others)."""
        self.registry.add(self)
        for index, token_ids in enumerate(self.prompts):
            self._tasks.append(asyncio.create_task(self._pump(index, token_ids)))
        started = [False] * len(self.prompts)
        while not all(started):
            item = await self._queue.get()
            self._buffer.append(item)
            if item is None:
                return  # cancelled while starting: iteration reports aborts
            index, output = item
            if isinstance(output, BaseException):
                await self.close()
                raise output
            started[index] = True

    def token_counts(self) -> tuple[int, int, int]:
        """``(prompt, output, cached prompt)`` tokens of the prompts that have an output
        so far: each prompt counted once, every completion's tokens."""
        present = [index for index, last in enumerate(self._last) if last is not None]
        return (
            sum(len(self.prompts[index]) for index in present),
            sum(sum(self._num_output_tokens[index]) for index in present),
            sum(getattr(self._last[index], "num_cached_tokens", 0) for index in present),
        )

    def cancel(self) -> None:
        """End the iteration now with ``finish_reason="abort"`` (server shutdown)."""
        self._queue.put_nowait(None)

    async def __aiter__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        while not all(self._finished):
            item = self._buffer.popleft() if self._buffer else await self._queue.get()
            if item is None:
                for index, finished in enumerate(self._finished):
                    if not finished:
                        output = self._aborted_output(index)
                        self._observe(index, output)
                        yield index, output
                break
            index, result = item
            if isinstance(result, BaseException):
                raise result
            self._observe(index, result)
            yield index, result
        await self.close()

    async def close(self) -> None:
        """Abort what still runs (idempotent); unfinished prompts count as aborted."""
        if self._closed:
            return
        self._closed = True
        self.registry.discard(self)
        for index, finished in enumerate(self._finished):
            if not finished:
                self._observe(index, self._aborted_output(index))
        for task in self._tasks:
            task.cancel()
        # Cancelling a pump closes its engine stream, which queues the abort. Everything
        # above is synchronous: when the caller is being cancelled (a client that left a
        # stream), this await may be cut short, and the pumps are cancelled regardless.
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- internals ------------------------------------------------------------------------

    async def _pump(self, index: int, token_ids: list[int]) -> None:
        try:
            async for output in self.engine.generate(
                {"prompt_token_ids": token_ids},
                self.params,
                self.engine_request_id(index),
                priority=self.priority,
            ):
                self._queue.put_nowait((index, output))
        except asyncio.CancelledError:
            raise
        except BaseException as error:  # delivered to the consumer, which raises it
            self._queue.put_nowait((index, error))

    def _observe(self, index: int, output: RequestOutput) -> None:
        if self._finished[index]:
            return
        now = time.monotonic()
        self._last[index] = output
        counts = self._num_output_tokens[index]
        delta = self.params.output_kind == RequestOutputKind.DELTA
        for completion in output.outputs:
            before = counts[completion.index] if delta else 0
            counts[completion.index] = before + len(completion.token_ids)
        if self._first_token_time[index] is None and any(c.token_ids for c in output.outputs):
            # A final-only output comes long after its first token: the engine's time of it
            # then (time.monotonic, one clock for every process of the machine).
            final_only = self.params.output_kind == RequestOutputKind.FINAL_ONLY
            first = output.metrics.get("first_token_time") if final_only else None
            self._first_token_time[index] = now if first is None else first
        if not output.finished:
            return
        self._finished[index] = True
        first = self._first_token_time[index]
        ttft = None if first is None else first - self.arrival
        for position, completion in enumerate(output.outputs):
            self.metrics.record_sequence(
                len(self.prompts[index]) if position == 0 else 0,
                counts[completion.index],
                completion.finish_reason,
                ttft,
                now - self.arrival,
            )

    def _aborted_output(self, index: int) -> RequestOutput:
        """The output that ends an unfinished prompt, each running completion
        ``"abort"``: nothing new (a ``DELTA`` stream has sent the rest), or its last."""
        last = self._last[index]
        empty: list[SampleLogprobs] | None = [] if self.params.logprobs is not None else None
        if last is None:
            completions = [
                CompletionOutput(i, "", [], None, empty, finish_reason="abort")
                for i in range(self.params.n)
            ]
            return RequestOutput(
                self.engine_request_id(index), None, self.prompts[index], None, completions, True
            )
        if self.params.output_kind == RequestOutputKind.DELTA:
            completions = [
                dataclasses.replace(
                    c,
                    text="",
                    token_ids=[],
                    logprobs=empty,
                    finish_reason=c.finish_reason or "abort",
                )
                for c in last.outputs
            ]
            return dataclasses.replace(
                last, prompt_logprobs=None, outputs=completions, finished=True
            )
        completions = [
            c if c.finished else dataclasses.replace(c, finish_reason="abort") for c in last.outputs
        ]
        return dataclasses.replace(last, outputs=completions, finished=True)


async def until_disconnected(request: Request, awaitable: Awaitable[T]) -> T:
    """Await ``awaitable``; if the client disconnects first, cancel it (which aborts its
    engine requests) and raise :class:`ClientDisconnected`.

    Reads ``request.receive()``: call it only after the body has been read.
    """
    work: asyncio.Future[T] = asyncio.ensure_future(awaitable)
    watcher: asyncio.Future[None] = asyncio.ensure_future(_wait_for_disconnect(request))
    pending: set[asyncio.Future[Any]] = {work, watcher}
    try:
        await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        work.cancel()
        raise
    finally:
        watcher.cancel()
    if not work.done():
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)
        raise ClientDisconnected()
    return work.result()


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message: MutableMapping[str, Any] = await request.receive()
        if message["type"] == "http.disconnect":
            return
