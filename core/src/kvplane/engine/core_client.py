"""The server side of the engine-core process (see :mod:`kvplane.engine.engine_core`).

:class:`EngineProcessClient` starts the engine in a child process (``spawn``: a fresh
interpreter, safe with CUDA), loads the tokenizer here for the streams, sends requests
and aborts down one pipe and reads step outputs from the other on a thread of its own,
where it rebuilds each request's cumulative output from the deltas.

When the child dies (a step raised out of the engine, a signal, out of memory), the
reader sees the pipe close and ends every stream with ``EngineDeadError``; the server
then exits with status 1. It never waits on a dead child.
"""

from __future__ import annotations

import logging
import multiprocessing
import queue
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from kvplane.config import EngineConfig
from kvplane.engine.engine_core import (
    AbortRequest,
    AddRequest,
    CoreFailed,
    Ready,
    Shutdown,
    StartFailed,
    StepOutputs,
    run_engine_core,
)
from kvplane.engine.outputs import CompletionOutput, RequestOutput, accumulate
from kvplane.models.config import load_engine_tokenizer
from kvplane.models.source import ModelSource, resolve_model
from kvplane.sampling.params import RequestOutputKind, SamplingParams
from kvplane.scheduler.output import SchedulerStats

if TYPE_CHECKING:
    from kvplane.engine.async_llm import AsyncLLM
    from kvplane.models.config import ModelConfig

logger = logging.getLogger(__name__)

#: Seconds the engine process gets to stop on shutdown before it is killed.
SHUTDOWN_TIMEOUT_S = 30.0


class EngineClientBase:
    """What both engine clients share: requests down a command pipe to an
    :class:`~kvplane.engine.engine_core.EngineCoreLoop`, its step outputs rebuilt into
    cumulative outputs for the streams. Subclasses start the loop and feed
    :meth:`_dispatch`."""

    config: EngineConfig
    model_config: ModelConfig
    tokenizer: Any | None

    def __init__(self, commands: Connection, initial_stats: SchedulerStats) -> None:
        self._commands = commands
        self._initial_stats = initial_stats
        # Commands go out from a thread of their own: a pipe holds 64 KiB, and a long
        # prompt's ids would otherwise block the event loop until the engine's step ends.
        self._outbox: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send_commands, name="kvplane-engine-sender")
        self._sender.daemon = True
        self._sender.start()
        self._live: dict[str, _LiveRequest] = {}
        self._streams: AsyncLLM | None = None

    def initial_stats(self) -> SchedulerStats:
        """The scheduler's stats before the first step."""
        return self._initial_stats

    def start(self, streams: AsyncLLM) -> None:
        """Begin stepping; outputs, stats and death go to ``streams``'s ``deliver``,
        ``publish_stats`` and ``die``."""
        raise NotImplementedError

    def shutdown(self) -> None:
        """Stop the engine and wait for it (idempotent)."""
        raise NotImplementedError

    def is_alive(self) -> bool:
        raise NotImplementedError

    def add(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        prompt: str | None,
        params: SamplingParams,
        priority: int,
    ) -> None:
        """Queue a checked request (any thread)."""
        cumulative = None
        if params.output_kind == RequestOutputKind.CUMULATIVE:
            empty_logprobs: list[Any] | None = [] if params.logprobs is not None else None
            cumulative = RequestOutput(
                request_id=request_id,
                prompt=prompt,
                prompt_token_ids=prompt_token_ids,
                prompt_logprobs=None,
                outputs=[
                    CompletionOutput(i, "", [], None, empty_logprobs) for i in range(params.n)
                ],
                finished=False,
            )
        self._live[request_id] = _LiveRequest(prompt, prompt_token_ids, cumulative)
        self._send(AddRequest(request_id, prompt_token_ids, prompt, params, priority))

    def abort(self, request_id: str) -> None:
        """Queue an abort (any thread); unknown or finished ids are ignored."""
        if self._live.pop(request_id, None) is not None:
            self._send(AbortRequest(request_id))

    def _send(self, message: object) -> None:
        """Queue ``message`` for the engine's loop (any thread; never blocks)."""
        self._outbox.put(message)

    def _send_commands(self) -> None:
        """The sender thread: until a :class:`Shutdown` is sent or the pipe breaks."""
        while True:
            message = self._outbox.get()
            try:
                self._commands.send(message)
            except (BrokenPipeError, ConnectionResetError, EOFError, OSError):
                return  # the loop has gone; its death is reported where it is watched
            except Exception as error:  # it does not pickle: that request fails alone
                if isinstance(message, AddRequest) and self._streams is not None:
                    self._live.pop(message.request_id, None)
                    self._streams.deliver(message.request_id, error)
                continue
            if isinstance(message, Shutdown):
                return

    def _dispatch(self, message: StepOutputs) -> None:
        streams = self._streams
        assert streams is not None
        deliveries: list[tuple[str, RequestOutput | BaseException]] = []
        for request_id, error in message.rejected:
            self._live.pop(request_id, None)
            deliveries.append((request_id, error))
        for output in message.outputs:
            request_id = output.request_id
            live = self._live.get(request_id)
            if live is None:  # aborted meanwhile
                continue
            output.prompt, output.prompt_token_ids = live.prompt, live.prompt_token_ids
            if live.cumulative is not None:
                output = live.cumulative = accumulate(live.cumulative, output)
            if output.finished:
                del self._live[request_id]
            if output.error is None:
                deliveries.append((request_id, output))
            else:
                streams.deliver_failure(request_id, output.error)
        streams.deliver_all(deliveries)
        streams.publish_stats(message.stats, message.num_sequences_added)


@dataclass(slots=True)
class _LiveRequest:
    """What the client keeps of a request until its last output: the prompt (outputs
    arrive without it), and for a ``CUMULATIVE`` request its output so far."""

    prompt: str | None
    prompt_token_ids: list[int]
    cumulative: RequestOutput | None


class EngineProcessClient(EngineClientBase):
    """Runs the engine of ``config`` in a child process; blocks until it has loaded.

    Raises what the engine raised when it cannot start (a ``ValueError`` for a bad
    option, ``FileNotFoundError`` for a missing model, ...), or ``RuntimeError`` when the
    process died before it was ready.
    """

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        context = multiprocessing.get_context("spawn")
        commands_reader, commands = context.Pipe(duplex=False)
        self._outputs, outputs_writer = context.Pipe(duplex=False)
        log_level = logging.getLogger().getEffectiveLevel() if logging.getLogger().handlers else 0
        self.process = context.Process(
            target=run_engine_core,
            args=(config, commands_reader, outputs_writer, log_level),
            name="kvplane-engine-core",
            daemon=True,
        )
        self.process.start()
        # Only the child holds these ends now: its death closes the outputs pipe.
        commands_reader.close()
        outputs_writer.close()
        tokenizer = _TokenizerLoader(config)  # meanwhile: building one can take seconds
        ready = self._wait_until_ready()
        super().__init__(commands, ready.stats)
        self.config = ready.config
        self.model_config = ready.model_config
        self.tokenizer = tokenizer.result(ready.model_config.source)
        self._closing = False
        self._reader = threading.Thread(
            target=self._read_outputs, name="kvplane-engine-reader", daemon=True
        )

    def _wait_until_ready(self) -> Ready:
        try:
            message = self._outputs.recv()
        except EOFError:
            self.process.join(timeout=5)
            raise RuntimeError(
                f"the engine process exited (status {self.process.exitcode}) before it was "
                "ready; its log above says why"
            ) from None
        if isinstance(message, StartFailed):
            self.process.join(timeout=5)
            logger.debug("the engine process failed to start:\n%s", message.traceback)
            raise message.error
        assert isinstance(message, Ready), message
        return message

    def start(self, streams: AsyncLLM) -> None:
        self._streams = streams
        self._reader.start()

    def shutdown(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._send(Shutdown())
        self.process.join(timeout=SHUTDOWN_TIMEOUT_S)
        if self.process.is_alive():
            logger.warning(
                "the engine process did not stop in %.0f s: killing it", SHUTDOWN_TIMEOUT_S
            )
            self.process.kill()
            self.process.join(timeout=5)
        if self._reader.is_alive() and self._reader is not threading.current_thread():
            self._reader.join(timeout=5)

    def is_alive(self) -> bool:
        return self.process.is_alive()

    def _read_outputs(self) -> None:
        """The reader thread: dispatch step outputs until the pipe closes."""
        streams = self._streams
        assert streams is not None
        while True:
            try:
                message = self._outputs.recv()
            except (EOFError, OSError):
                break
            if isinstance(message, StepOutputs):
                self._dispatch(message)
            elif isinstance(message, CoreFailed):
                streams.die(RuntimeError(message.error))
                return
        if self._closing:
            return
        self.process.join(timeout=5)
        streams.die(RuntimeError(f"the engine process exited (status {self.process.exitcode})"))


class _TokenizerLoader:
    """Loads the engine's tokenizer on a thread while the engine process starts."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._tokenizer: Any | None = None
        self._loaded = False
        self._thread = threading.Thread(target=self._load, name="kvplane-tokenizer", daemon=True)
        self._thread.start()

    def _load(self) -> None:
        try:
            source = resolve_model(self.config.model, self.config.load_format)
            self._tokenizer = load_engine_tokenizer(self.config, source)
            self._loaded = True
        except Exception:  # the engine process reports the same problem, or it is loaded again
            logger.debug("loading the tokenizer beside the engine failed", exc_info=True)

    def result(self, source: ModelSource) -> Any | None:
        """The tokenizer, loaded for ``source`` (the engine's) if the thread could not."""
        self._thread.join()
        if self._loaded:
            return self._tokenizer
        return load_engine_tokenizer(self.config, source)
