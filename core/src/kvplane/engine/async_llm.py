"""The asynchronous engine the server uses: streams on the event loop, the engine apart.

:class:`AsyncLLM` owns the streams: it tokenizes and checks a prompt, hands the request
to an engine client and hands each step's outputs to the requests' streams with one
``call_soon_threadsafe`` (see :mod:`kvplane.engine.output_sink`: a stream that falls
behind gets its waiting outputs merged), so a step never waits for a client and a client
never blocks a step. Two clients run the engine loop:

- :class:`~kvplane.engine.core_client.EngineProcessClient` (``AsyncLLM.from_config``
  with ``engine_process=True``, the server's default): the engine in a child process
  (see :mod:`kvplane.engine.engine_core`), so HTTP, tokenization and the engine's host
  work do not share one interpreter;
- :class:`~kvplane.engine.thread_client.EngineThreadClient` (``AsyncLLM(engine)``): the
  engine on a thread of this process (tests that reach into the engine, embedding).

A request the engine failed on alone ends its stream with :class:`RequestFailedError`;
the others go on. When the engine cannot go on (a step raised out of it, or its process
died), every stream ends with :class:`EngineDeadError`, every later request gets it, and
the :meth:`AsyncLLM.on_death` callbacks run: the server exits so that its supervisor
restarts it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from kvplane.config import EngineConfig
from kvplane.engine.output_sink import OutputSink, put_all
from kvplane.engine.outputs import RequestOutput
from kvplane.engine.prompts import PromptType, tokenize_prompt, validate_prompt
from kvplane.sampling.params import SamplingParams
from kvplane.scheduler.output import SchedulerStats

if TYPE_CHECKING:
    from kvplane.engine.core_client import EngineClientBase
    from kvplane.engine.llm_engine import LLMEngine
    from kvplane.models.config import ModelConfig

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine stopped on an error; no request can be served."""


class RequestFailedError(RuntimeError):
    """The engine failed on this request alone (its message says how); it serves the others."""


class AsyncLLM:
    """``async for output in llm.generate(prompt, params, request_id)``; ``abort``."""

    def __init__(self, engine: LLMEngine | EngineClientBase) -> None:
        from kvplane.engine.core_client import EngineClientBase
        from kvplane.engine.thread_client import EngineThreadClient

        # An LLMEngine is stepped on a thread here.
        self.client = engine if isinstance(engine, EngineClientBase) else EngineThreadClient(engine)
        self._sinks: dict[str, OutputSink] = {}
        self._error: BaseException | None = None
        self._death_callbacks: list[Callable[[BaseException], None]] = []
        self._death_lock = threading.Lock()  # _error and the callbacks, set across threads
        # Stats come from the engine after each step, so nothing reads scheduler state
        # mid-step. Sequences queued by generate() count as waiting until a snapshot
        # that includes them is published.
        self._stats: SchedulerStats = self.client.initial_stats()
        self._stats_lock = threading.Lock()
        self._num_unapplied = 0  # guarded by _stats_lock
        self.client.start(self)

    @classmethod
    def from_config(cls, config: EngineConfig) -> AsyncLLM:
        """The engine of ``config`` in its own process (``config.engine_process``) or on a
        thread of this one."""
        if config.engine_process:
            from kvplane.engine.core_client import EngineProcessClient

            return cls(EngineProcessClient(config))
        from kvplane.engine.llm_engine import LLMEngine

        return cls(LLMEngine(config))

    @property
    def engine(self) -> LLMEngine:
        """The in-process engine (thread client only: tests and embedding reach into it)."""
        engine = getattr(self.client, "engine", None)
        if engine is None:
            raise AttributeError("the engine runs in another process")
        return engine  # type: ignore[no-any-return]

    @property
    def tokenizer(self) -> Any:
        return self.client.tokenizer

    @property
    def model_config(self) -> ModelConfig:
        return self.client.model_config

    @property
    def config(self) -> EngineConfig:
        return self.client.config

    @property
    def is_running(self) -> bool:
        return self._error is None and self.client.is_alive()

    def stats(self) -> SchedulerStats:
        """The scheduler's stats after the engine's latest step; any thread may call."""
        return self._stats

    @property
    def num_waiting(self) -> int:
        """Sequences waiting to be scheduled, counting those not yet taken in by the engine
        (``n`` per request); any thread may read it."""
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

        The prompt is checked here (ValueError before anything is queued). Leaving the
        iteration early (client gone, task cancelled) aborts the request.
        """
        if self._error is not None:
            raise EngineDeadError(f"engine stopped: {self._error!r}")
        text, prompt_token_ids = tokenize_prompt(self.tokenizer, prompt)
        config = self.model_config
        validate_prompt(prompt_token_ids, config.max_model_len, config.hf_config.vocab_size)
        sink = OutputSink(request_id, asyncio.get_running_loop(), params.output_kind)
        with self._stats_lock:
            self._num_unapplied += params.n
        self._sinks[request_id] = sink
        # A death after the check above ends this stream too: die() sets the error before
        # it ends the registered streams.
        if self._error is not None:
            self.deliver(request_id, EngineDeadError(f"engine stopped: {self._error!r}"))
        else:
            self.client.add(request_id, prompt_token_ids, text, params, priority)
        finished = False
        try:
            while True:
                item = await sink.get()
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
        has): on the engine's thread, after every stream has been ended."""
        with self._death_lock:
            error = self._error
            if error is None:
                self._death_callbacks.append(callback)
        if error is not None:
            callback(error)

    def abort(self, request_id: str) -> None:
        """Abort a request; its blocks are freed at the engine's next step boundary."""
        if self._sinks.pop(request_id, None) is not None and self._error is None:
            self.client.abort(request_id)

    def shutdown(self) -> None:
        self.client.shutdown()

    # -- called by the engine client, on its thread ----------------------------------------

    def deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        """Hand ``item`` to the request's stream (dropped when nobody listens)."""
        self.deliver_all([(request_id, item)])

    def deliver_all(self, items: list[tuple[str, RequestOutput | BaseException]]) -> None:
        """Hand each ``(request_id, item)`` to its stream: one wake-up per event loop."""
        batches: dict[asyncio.AbstractEventLoop, list[tuple[OutputSink, Any]]] = {}
        for request_id, item in items:
            sink = self._sinks.get(request_id)
            if sink is None:
                continue
            if isinstance(item, BaseException) or item.finished:
                self._sinks.pop(request_id, None)
            batches.setdefault(sink.loop, []).append((sink, item))
        for loop, batch in batches.items():
            try:
                loop.call_soon_threadsafe(put_all, batch)
            except RuntimeError:  # the client's loop is closed: nobody is listening
                if self._error is None:  # else the engine is gone, and the requests too
                    for sink, _ in batch:
                        self.client.abort(sink.request_id)

    def deliver_failure(self, request_id: str, error: str) -> None:
        self.deliver(request_id, RequestFailedError(f"the engine failed on this request: {error}"))

    def publish_stats(self, stats: SchedulerStats, num_sequences_taken: int) -> None:
        """Record the stats after a step; ``num_sequences_taken`` queued sequences have
        reached the engine since the previous call."""
        with self._stats_lock:
            self._stats = stats
            self._num_unapplied -= num_sequences_taken

    def die(self, error: BaseException) -> None:
        """End every stream, then call the death callbacks (once)."""
        message = f"engine stopped: {error!r}"
        with self._death_lock:
            if self._error is not None:
                return
            self._error = error
            callbacks, self._death_callbacks = self._death_callbacks, []
        for request_id in list(self._sinks):
            self.deliver(request_id, EngineDeadError(message))
        for callback in callbacks:
            try:
                callback(error)
            except Exception:
                logger.exception("an engine-death callback failed")
