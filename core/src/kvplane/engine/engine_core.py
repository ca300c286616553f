"""The engine-core process: the engine loop on its own interpreter, fed over pipes.

The server's process keeps HTTP, tokenization and the streams; this process keeps the
model and steps while there is work, so neither waits on the other's Python. Messages
are pickled dataclasses (below) on two one-way :func:`multiprocessing.Pipe` connections.

Outputs cross as deltas: the engine builds a request that asked for cumulative outputs
as a ``DELTA`` one, each :class:`~kvplane.engine.outputs.RequestOutput` carrying only
what the request gained since its previous one, and the client side rebuilds the
cumulative output. Outputs cross without their prompt (text and ids; see
``StepOutputs.__reduce__``), which the client kept when it sent the request, and puts
back. A step's message, and the engine's work for it, grow with
the number of tokens it made, not with the length of every prompt and output so far.

Lifetime belongs to the parent: this process ignores SIGINT and SIGTERM (a Ctrl-C in a
terminal reaches the whole process group, and the server drains before it stops the
engine), and exits when its command pipe closes (the parent has gone).
"""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from kvplane.config import EngineConfig
from kvplane.engine.loop_stats import LoopStats
from kvplane.engine.outputs import CompletionOutput, RequestOutput
from kvplane.log import configure_logging
from kvplane.models.config import ModelConfig
from kvplane.sampling.params import RequestOutputKind, SamplingParams
from kvplane.scheduler.output import SchedulerStats

logger = logging.getLogger(__name__)

# -- parent -> core ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AddRequest:
    request_id: str
    prompt_token_ids: list[int]
    prompt: str | None
    params: SamplingParams
    priority: int


@dataclass(frozen=True, slots=True)
class AbortRequest:
    request_id: str


@dataclass(frozen=True, slots=True)
class Shutdown:
    pass


# -- core -> parent ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ready:
    """The engine has loaded; what the client side needs to serve (tokenizer loaded there)."""

    #: The options with the device's defaults filled in (batch limits).
    config: EngineConfig
    model_config: ModelConfig
    stats: SchedulerStats


@dataclass(frozen=True, slots=True)
class StartFailed:
    """The engine could not start: ``error`` as raised (or a RuntimeError carrying its repr
    when it does not pickle), and its traceback text for the log."""

    error: BaseException
    traceback: str


@dataclass(frozen=True, slots=True)
class StepOutputs:
    """One step's outputs, the stats after it, and how many sequences (``n`` per request)
    the core took in since its previous message (the client's count of queued ones)."""

    #: ``DELTA`` outputs, or the final output of a ``FINAL_ONLY`` request.
    outputs: list[RequestOutput]
    stats: SchedulerStats
    num_sequences_added: int
    #: Requests that could not be added (ValueError and the like), with the error.
    rejected: list[tuple[str, BaseException]] = field(default_factory=list)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # Outputs cross as plain tuples (pickling a slotted dataclass goes through Python
        # code per object, on the engine's critical path), without the prompt: the client
        # kept it when it sent the request.
        wire = [_output_to_wire(output) for output in self.outputs]
        return (
            _step_outputs_from_wire,
            (wire, self.stats, self.num_sequences_added, self.rejected),
        )


def _output_to_wire(output: RequestOutput) -> tuple[Any, ...]:
    completions = [
        (
            c.index,
            c.text,
            c.token_ids,
            c.cumulative_logprob,
            c.logprobs,
            c.finish_reason,
            c.stop_reason,
        )
        for c in output.outputs
    ]
    return (
        output.request_id,
        output.prompt_logprobs,
        completions,
        output.finished,
        output.num_cached_tokens,
        output.metrics,
        output.error,
    )


def _step_outputs_from_wire(
    wire: list[tuple[Any, ...]],
    stats: SchedulerStats,
    num_sequences_added: int,
    rejected: list[tuple[str, BaseException]],
) -> StepOutputs:
    outputs = [
        RequestOutput(
            request_id,
            None,
            [],
            prompt_logprobs,
            [CompletionOutput(*completion) for completion in completions],
            finished,
            num_cached_tokens,
            metrics,
            error,
        )
        for (
            request_id,
            prompt_logprobs,
            completions,
            finished,
            num_cached_tokens,
            metrics,
            error,
        ) in wire
    ]
    return StepOutputs(outputs, stats, num_sequences_added, rejected)


@dataclass(frozen=True, slots=True)
class CoreFailed:
    """A step raised out of the engine: it cannot go on, and this process exits."""

    error: str


# -- the process -------------------------------------------------------------------------


def run_engine_core(
    config: EngineConfig, commands: Connection, outputs: Connection, log_level: int
) -> None:
    """The child process's entry point (see the module docstring)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if log_level != logging.NOTSET:
        configure_logging(log_level)
    # The import loads torch and the platforms: inside the child, after the signals.
    from kvplane.engine.llm_engine import LLMEngine

    try:
        engine = LLMEngine(config)
    except BaseException as error:
        import traceback

        outputs.send(StartFailed(picklable(error), traceback.format_exc()))
        sys.exit(1)
    outputs.send(Ready(engine.config, engine.model_config, engine.stats()))
    try:
        EngineCoreLoop(engine, commands, outputs.send).run()
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass  # the parent has gone: so does the engine
    except BaseException as error:
        logger.exception("the engine cannot go on")
        try:
            outputs.send(CoreFailed(repr(error)))
        finally:
            sys.exit(1)


class EngineCoreLoop:
    """Apply commands, step, emit the step's outputs; block only when there is no work.

    Runs in the engine-core process (``emit`` sends down the outputs pipe) or on a thread
    of the caller's process (``emit`` hands the outputs over directly).
    """

    def __init__(
        self, engine: Any, commands: Connection, emit: Callable[[StepOutputs], None]
    ) -> None:
        self.engine = engine
        self.commands = commands
        self.emit = emit
        self._num_added = 0
        self._rejected: list[tuple[str, BaseException]] = []
        self.stats = LoopStats(engine, engine.config.log_stats_interval)

    def run(self) -> None:
        """Until a :class:`Shutdown` arrives; what a step raises propagates."""
        stats = self.stats
        while True:
            if not self._apply_commands(block=not self.engine.has_unfinished_requests()):
                return
            step_outputs = []
            if self.engine.has_unfinished_requests():
                with stats.phase("step"):
                    step_outputs = self.engine.step()
                stats.count_step()
            with stats.phase("emit"):
                self.emit(
                    StepOutputs(step_outputs, self.engine.stats(), self._num_added, self._rejected)
                )
            self._num_added = 0
            self._rejected = []
            stats.maybe_log()

    def _apply_commands(self, block: bool) -> bool:
        """Apply every queued command (waiting for one if ``block``); False: shut down."""
        if not block and not self.commands.poll():
            return True
        if block:
            with self.stats.phase("idle"):
                self.commands.poll(None)
            self.stats.maybe_log()
        while True:
            with self.stats.phase("commands"):
                command = self.commands.recv()
                if isinstance(command, Shutdown):
                    return False
                self._apply(command)
            if not self.commands.poll():
                return True

    def _apply(self, command: AddRequest | AbortRequest) -> None:
        if isinstance(command, AbortRequest):
            self.engine.abort_request(command.request_id)
            return
        self._num_added += command.params.n
        if command.params.output_kind == RequestOutputKind.CUMULATIVE:
            # The client rebuilds it (the params arrived pickled: a copy of the caller's).
            command.params.output_kind = RequestOutputKind.DELTA
        try:
            self.engine.add_request(
                command.request_id,
                {"prompt_token_ids": command.prompt_token_ids, "prompt": command.prompt},
                command.params,
                priority=command.priority,
            )
        except Exception as error:
            self._rejected.append((command.request_id, picklable(error)))


def picklable(error: BaseException) -> BaseException:
    """``error`` itself when it survives pickling, else a RuntimeError with its repr."""
    import pickle

    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return RuntimeError(repr(error))
    return error
