"""The asynchronous engine the server uses: the loop runs on its own thread.

Requests and aborts are queued to the engine thread; it steps while there is work and
hands each output to the request's asyncio queue with ``call_soon_threadsafe``, so a step
never waits for a client and a client never blocks a step.

A request the engine failed on alone ends its stream with :class:`RequestFailedError`;
the others go on. When a step raises out of the engine (it cannot go on), the thread
records the error, ends every stream with :class:`EngineDeadError`, answers every later
request with it and calls the :meth:`AsyncLLM.on_death` callbacks: the server exits so
that its supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from kvplane.config import EngineConfig
from kvplane.engine.llm_engine import LLMEngine, PromptType
from kvplane.engine.outputs import RequestOutput
from kvplane.sampling.params import SamplingParams
from kvplane.scheduler.output import SchedulerStats

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _AddCommand:
    request_id: str
    prompt: PromptType
    params: SamplingParams
    priority: int
    sink: Any  # (loop, asyncio.Queue)


@dataclass(frozen=True, slots=True)
class _AbortCommand:
    request_id: str


class EngineDeadError(RuntimeError):
    """The engine thread stopped on an error; no request can be served."""


class RequestFailedError(RuntimeError):
    """The engine failed on this request alone (its message says how); it serves the others."""


class AsyncLLM:
    """``async for output in llm.generate(prompt, params, request_id)``; ``await abort``."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue[_AddCommand | _AbortCommand | None] = queue.SimpleQueue()
        self._sinks: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[Any]]] = {}
        self._error: BaseException | None = None
        self._death_callbacks: list[Callable[[BaseException], None]] = []
        self._death_lock = threading.Lock()  # _error and the callbacks, set across threads
        # Stats are published by the engine thread after each step, so other threads never
        # read scheduler state mid-step. Sequences queued by generate() count as waiting
        # until a snapshot that includes them is published.
        self._stats: SchedulerStats = engine.stats()
        self._stats_lock = threading.Lock()
        self._num_unapplied = 0  # guarded by _stats_lock
        self._num_applied_since_publish = 0  # engine thread only
        self._thread = threading.Thread(target=self._run, name="kvplane-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, config: EngineConfig) -> AsyncLLM:
        return cls(LLMEngine(config))

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and self._error is None

    def stats(self) -> SchedulerStats:
        """The scheduler's stats after the engine thread's latest step; any thread may call."""
        return self._stats

    @property
    def num_waiting(self) -> int:
        """Sequences waiting to be scheduled, counting those not yet handed to the engine
        thread (``n`` per request); any thread may read it."""
        with self._stats_lock:
            return self._stats.num_waiting + self._num_unapplied

    async def generate(
        self,
        prompt: PromptType,
        params: SamplingParams,
        request_id: str,
        priority: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """Stream cumulative outputs until the request finishes.

        The prompt is validated here (ValueError before anything is queued). Leaving the
        iteration early (client gone, task cancelled) aborts the request.
        """
        if self._error is not None:
            raise EngineDeadError(f"engine stopped: {self._error!r}")
        _, prompt_token_ids = self.engine.tokenize_prompt(prompt)
        self.engine._validate_prompt(prompt_token_ids)
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[Any] = asyncio.Queue()
        with self._stats_lock:
            self._num_unapplied += params.n
        self._commands.put(
            _AddCommand(
                request_id,
                {
                    "prompt_token_ids": prompt_token_ids,
                    "prompt": prompt if isinstance(prompt, str) else None,
                },
                params,
                priority,
                (loop, outputs),
            )
        )
        finished = False
        try:
            while True:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def on_death(self, callback: Callable[[BaseException], None]) -> None:
        """Call ``callback(error)`` once if the engine stops on an error (at once if it
        has): on the engine thread, after every stream has been ended."""
        with self._death_lock:
            error = self._error
            if error is None:
                self._death_callbacks.append(callback)
        if error is not None:
            callback(error)

    def abort(self, request_id: str) -> None:
        """Abort a request; its blocks are freed at the engine's next step boundary."""
        self._commands.put(_AbortCommand(request_id))

    def shutdown(self) -> None:
        self._commands.put(None)
        self._thread.join(timeout=30)

    # -- the engine thread ----------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                block = not self.engine.has_unfinished_requests()
                if not self._drain_commands(block):
                    return
                for output in self.engine.step():
                    if output.error is None:
                        self._deliver(output.request_id, output)
                    else:
                        failure = f"the engine failed on this request: {output.error}"
                        self._deliver(output.request_id, RequestFailedError(failure))
                self._publish_stats()
        except BaseException as error:
            logger.exception("engine thread failed: the engine cannot go on")
            self._die(error)

    def _die(self, error: BaseException) -> None:
        """End every stream, call the death callbacks, then answer every command that
        arrives with the error until shut down (so no request waits for ever)."""
        message = f"engine stopped: {error!r}"
        with self._death_lock:
            self._error = error
            callbacks, self._death_callbacks = self._death_callbacks, []
        for request_id in list(self._sinks):
            self._deliver(request_id, EngineDeadError(message))
        for callback in callbacks:
            try:
                callback(error)
            except Exception:
                logger.exception("an engine-death callback failed")
        while (command := self._commands.get()) is not None:
            if isinstance(command, _AddCommand):
                self._sinks[command.request_id] = command.sink
                self._deliver(command.request_id, EngineDeadError(message))

    def _drain_commands(self, block: bool) -> bool:
        """Apply queued commands (waiting for one if ``block``); False means shut down."""
        try:
            command = self._commands.get(block=block)
        except queue.Empty:
            return True
        while True:
            if command is None:
                return False
            self._apply(command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return True

    def _publish_stats(self) -> None:
        stats = self.engine.stats()
        with self._stats_lock:
            self._stats = stats
            self._num_unapplied -= self._num_applied_since_publish
        self._num_applied_since_publish = 0

    def _apply(self, command: _AddCommand | _AbortCommand) -> None:
        if isinstance(command, _AbortCommand):
            if self._sinks.pop(command.request_id, None) is not None:
                self.engine.abort_request(command.request_id)
            return
        self._num_applied_since_publish += command.params.n
        self._sinks[command.request_id] = command.sink
        try:
            self.engine.add_request(
                command.request_id, command.prompt, command.params, priority=command.priority
            )
        except Exception as error:
            self._deliver(command.request_id, error)

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        sink = self._sinks.get(request_id)
        if sink is None:
            return
        loop, outputs = sink
        if isinstance(item, BaseException) or item.finished:
            self._sinks.pop(request_id, None)
        try:
            loop.call_soon_threadsafe(outputs.put_nowait, item)
        except RuntimeError:  # the client's loop is closed: nobody is listening
            if self._error is None:  # else the engine is gone, and the request with it
                self.engine.abort_request(request_id)
