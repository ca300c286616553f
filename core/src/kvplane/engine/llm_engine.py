"""The engine loop: schedule, execute, sample, detokenize, repeat.

Single-threaded and synchronous; :class:`kvplane.engine.async_llm.AsyncLLM` runs it in a
process of its own for the server (or on a thread of the caller's).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable

import torch

from kvplane.config import EngineConfig
from kvplane.engine.batch_limits import with_batch_limits
from kvplane.engine.fault_isolation import FaultIsolation, request_id_of
from kvplane.engine.graph_capture import capture_step_graphs
from kvplane.engine.kv_sizing import num_kv_blocks
from kvplane.engine.model_runner import ModelRunner, PendingStep, StepResult
from kvplane.engine.output_processor import OutputProcessor
from kvplane.engine.outputs import RequestOutput
from kvplane.engine.prompts import PromptType, tokenize_prompt, validate_prompt
from kvplane.kv_cache.block_manager import BlockManager
from kvplane.models.config import load_engine_tokenizer, resolve_model_config
from kvplane.models.layers.context import BuildContext
from kvplane.models.loader import build_model
from kvplane.plugins import capabilities
from kvplane.plugins.selection import select_platform
from kvplane.quantization.config import resolve_quant_config
from kvplane.sampling.params import SamplingParams
from kvplane.sampling.sampler import (
    AllowedMaskFn,
    Sampler,
    SequenceSamplingState,
    make_generator,
)
from kvplane.scheduler.config import SchedulerConfig
from kvplane.scheduler.output import SchedulerOutput
from kvplane.scheduler.request import PLACEHOLDER_TOKEN_ID, Request, RequestStatus
from kvplane.scheduler.scheduler import Scheduler, SchedulerStats
from kvplane.spec_decode.proposers import build_spec_decoder
from kvplane.structured.compiler import StructuredOutputCompiler

logger = logging.getLogger(__name__)


class LLMEngine:
    """Owns the platform, model, KV cache, scheduler and output processing.

    Not thread-safe: one thread calls :meth:`add_request`, :meth:`abort_request` and
    :meth:`step`.
    """

    def __init__(self, config: EngineConfig) -> None:
        emulate = (config.emulate,) if config.emulate else ()
        self.platform = select_platform(config.device or config.emulate, emulate=emulate)
        #: The options as given, with the device's batch limits filled in.
        self.config = config = with_batch_limits(config, self.platform)
        limits = config.batch_limits()
        self.model_config = resolve_model_config(config, self.platform)
        has_tokenizer = self.model_config.source.has_files or config.tokenizer is not None
        if not has_tokenizer and not config.skip_tokenizer_init:
            logger.info(
                "%s has no tokenizer: prompts must be token ids",
                self.model_config.source.display_name,
            )
        self.tokenizer = load_engine_tokenizer(config, self.model_config.source)
        self.device = self.platform.device(0)
        torch.manual_seed(config.seed)
        ctx = BuildContext(
            platform=self.platform,
            dtype=self.model_config.dtype,
            device=self.device,
            block_size=config.block_size,
            quantization=resolve_quant_config(
                config.quantization,
                self.model_config.hf_config,
                is_gguf=self.model_config.source.is_gguf,
            ),
            kv_cache_dtype=config.resolved_kv_cache_dtype(),
        )
        model = build_model(
            self.model_config.hf_config, ctx, self.model_config.source, config.load_format
        )
        vocab_size = self.model_config.hf_config.vocab_size
        # Speculative decoding (None: off); a draft model loads here, before KV sizing.
        self.spec_decoder = build_spec_decoder(config, self.model_config, ctx)
        self.runner = ModelRunner(
            model,
            self.platform,
            self.device,
            config.block_size,
            Sampler(self.platform.ops, vocab_size),
            config.seed,
        )
        max_model_len = self.model_config.max_model_len
        num_blocks = num_kv_blocks(config, max_model_len, self.platform, self.runner)
        if self.spec_decoder is not None:  # a draft model's KV cache takes its share
            num_blocks = self.spec_decoder.share_kv_blocks(num_blocks, self.runner)
        self.runner.initialize_kv_cache(num_blocks)
        capture_step_graphs(self.runner, model, config, self.model_config.max_model_len)
        logger.info(
            "KV cache: %d blocks of %d tokens (%d tokens, %.1f MiB, %s)",
            num_blocks,
            config.block_size,
            num_blocks * config.block_size,
            num_blocks * self.runner.bytes_per_block() / 2**20,
            str(self.runner.kv_cache_dtype()).removeprefix("torch."),
        )
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=limits.max_num_seqs,
                max_num_batched_tokens=limits.max_num_batched_tokens,
                max_model_len=self.model_config.max_model_len,
                enable_prefix_caching=config.enable_prefix_caching,
                block_size=config.block_size,
            ),
            BlockManager(num_blocks, config.block_size, config.enable_prefix_caching),
        )
        self.output_processor = OutputProcessor(
            self.tokenizer, self.model_config.eos_token_ids, self.model_config.max_model_len
        )
        self._sampling_states: dict[str, SequenceSamplingState] = {}
        # Overlapped steps: the launched step whose tokens are not processed yet, and the
        # live sequences whose sampling reads their own tokens on the host (penalties,
        # grammars), which need every token back before their next step (no overlap).
        # Drafts are proposed from tokens on the host: speculation runs step by step.
        self._overlap = self.spec_decoder is None and (
            config.async_scheduling
            if config.async_scheduling is not None
            else self.platform.has_capability(capabilities.ASYNC_EXECUTION)
        )
        self._in_flight: tuple[SchedulerOutput, PendingStep] | None = None
        self._host_token_request_ids: set[str] = set()
        self._isolation = FaultIsolation(self)  # finds the request behind a failed step
        # Built on the first request with structured_output (loads xgrammar then).
        self._structured_compiler: StructuredOutputCompiler | None = None
        #: Tokens sampled since the engine started (every sequence, finished or not).
        self.num_generated_tokens = 0
        #: Tokens computed since the engine started (prompt and output, every step's).
        self.num_scheduled_tokens = 0

    # -- requests ------------------------------------------------------------------------

    def tokenize_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        """Return ``(prompt text or None, prompt token ids)`` for any accepted form."""
        return tokenize_prompt(self.tokenizer, prompt)

    def add_request(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams | None = None,
        arrival_time: float | None = None,
        priority: int = 0,
        final_only: bool = False,
    ) -> int:
        """Queue a request (without ``params``, the model's recommended sampling) and
        return its prompt's token count. Raises ``ValueError`` for a prompt that cannot be
        served.

        With ``final_only``, :meth:`step` returns the request's output only once it has
        finished (offline use), sparing a per-step copy of every request's tokens.
        """
        params = params or self.model_config.sampling_defaults.sampling_params()
        text, prompt_token_ids = self.tokenize_prompt(prompt)
        validate_prompt(
            prompt_token_ids,
            self.model_config.max_model_len,
            self.model_config.hf_config.vocab_size,
        )
        params.check_token_ids(self.model_config.hf_config.vocab_size)
        if self.tokenizer is None and params.detokenize:
            raise ValueError("detokenize=True needs a tokenizer, and this engine has none")
        mask_fns = self._grammar_constraints(params)
        arrival_time = time.monotonic() if arrival_time is None else arrival_time
        sequences = [
            Request(
                request_id=self._sequence_id(request_id, index),
                prompt_token_ids=list(prompt_token_ids),
                sampling_params=params,
                arrival_time=arrival_time,
                priority=priority,
                parent_id=None if index == 0 else request_id,
                max_output_tokens=params.max_tokens,
            )
            for index in range(params.n)
        ]
        if params.has_penalties or params.structured_output is not None:
            self._host_token_request_ids.update(s.request_id for s in sequences)
        for index, sequence in enumerate(sequences):
            seed = None if params.seed is None else params.seed + index
            self._sampling_states[sequence.request_id] = SequenceSamplingState(
                params=params,
                prompt_token_ids=sequence.prompt_token_ids,
                output_token_ids=sequence.output_token_ids,
                eos_token_ids=self.model_config.eos_token_ids,
                generator=None if seed is None else make_generator(seed, self.device),
                allowed_mask_fn=mask_fns[index],
            )
        self.output_processor.add_request(request_id, text, sequences, params, final_only)
        self.scheduler.add_request(sequences[0], children=sequences[1:])
        return len(prompt_token_ids)

    def _grammar_constraints(self, params: SamplingParams) -> list[AllowedMaskFn | None]:
        """One matcher per sequence for ``params.structured_output`` (``ValueError`` if invalid)."""
        if params.structured_output is None:
            return [None] * params.n
        if self._structured_compiler is None:
            self._structured_compiler = StructuredOutputCompiler(
                self.tokenizer,
                self.model_config.hf_config.vocab_size,
                self.model_config.eos_token_ids,
            )
        compiler = self._structured_compiler
        return [compiler.new_constraint(params.structured_output) for _ in range(params.n)]

    @staticmethod
    def _sequence_id(request_id: str, index: int) -> str:
        return request_id if index == 0 else f"{request_id}#{index}"

    def abort_request(self, request_ids: str | Iterable[str]) -> None:
        """Abort requests (all their sequences); their blocks are freed at once."""
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        for request_id in ids:
            for sequence_id in self.output_processor.sequence_ids(request_id):
                self._finish(sequence_id, RequestStatus.FINISHED_ABORTED)
            self.output_processor.abort_request(request_id)
        if self._in_flight is not None and not self.scheduler.has_unfinished_requests():
            # Its tokens all belong to aborted requests now: nothing left to wait for.
            self._in_flight = None

    def fail_request(self, request_id: str, error: BaseException) -> None:
        """Finish a request (all its sequences) because the engine failed on it alone: its
        output carries ``error`` and ``finish_reason="error"``; the engine goes on."""
        logger.error("request %s failed: %r", request_id, error, exc_info=error)
        self.output_processor.fail_request(request_id, error)
        for sequence_id in self.output_processor.sequence_ids(request_id):
            self._finish(sequence_id, RequestStatus.FINISHED_ERROR)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or self._in_flight is not None

    def _finish(self, sequence_id: str, status: RequestStatus) -> None:
        self.scheduler.finish_request(sequence_id, status)
        self._sampling_states.pop(sequence_id, None)
        self._host_token_request_ids.discard(sequence_id)
        if self.spec_decoder is not None:
            self.spec_decoder.remove_request(sequence_id)

    def stats(self) -> SchedulerStats:
        stats = self.scheduler.stats()
        if self.spec_decoder is None:
            return stats
        return dataclasses.replace(stats, spec_decode=self.spec_decoder.stats())

    # -- the loop ------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one scheduling step; return the outputs of the requests that progressed.

        With overlapped steps (``async_scheduling``), a call launches the next step and
        then processes the previous one's tokens while the device runs, so its outputs
        are one step behind. A step whose model work raises is dropped and its requests
        isolated (:mod:`kvplane.engine.fault_isolation`): only a request that fails alone
        ends, with an error. An exception from here means the engine cannot go on.
        """
        if self._overlap and not self._host_token_request_ids and not self._isolation.is_active:
            return self._step_overlapped()
        outputs = []
        if self._in_flight is not None:
            previous, self._in_flight = self._in_flight, None
            outputs = self._process_in_flight(previous)
        timer = self.runner.timer
        if self.spec_decoder is not None:
            with timer.phase("propose"):
                self.spec_decoder.propose(self.scheduler, self._sampling_states)
        output = self._schedule()
        if output.is_empty:
            return outputs
        try:
            result = self.runner.execute(
                output, self._sampling_states, self._prompt_logprobs_ids(output)
            )
        except Exception as error:
            return outputs + self._recover(error, output)
        with timer.phase("update"):
            accepted = result.accepted_token_ids()
            self.scheduler.update_from_output(output, result.sampled_token_ids, accepted)
            if self.spec_decoder is not None:
                self.spec_decoder.record(result.verified)
            self._isolation.step_succeeded(output)
            return outputs + self._process_result(result)

    def _step_overlapped(self) -> list[RequestOutput]:
        """Launch step k, then finish step k - 1 on the host while step k runs."""
        output = self._schedule()
        launched = None
        if not output.is_empty:
            try:
                launched = self.runner.launch(
                    output, self._sampling_states, self._prompt_logprobs_ids(output)
                )
            except Exception as error:
                return self._recover(error, output)  # drops the step in flight too
            self.scheduler.commit(output)
        previous = self._in_flight
        self._in_flight = None if launched is None else (output, launched)
        outputs = self._process_in_flight(previous) if previous is not None else []
        if launched is not None and self._in_flight is not None:  # else dropped: k - 1 failed
            # The launched step's tokens are known on the device only: placeholders let
            # the next schedule() count them, and the next launch reads them there.
            for request_id in launched.host.sample_request_ids:
                request = self.scheduler.get_request(request_id)
                if request is not None:
                    request.append_output_token(PLACEHOLDER_TOKEN_ID)
        return outputs

    def _schedule(self) -> SchedulerOutput:
        """The next step's schedule, timed and counted."""
        timer = self.runner.timer
        timer.count_step()
        with timer.phase("schedule"):
            output = self._isolation.schedule()
        num_seqs = len(output.scheduled)
        timer.label_step(num_seqs, output.num_batched_tokens == num_seqs)
        self.num_scheduled_tokens += output.num_batched_tokens
        return output

    def _process_in_flight(
        self, in_flight: tuple[SchedulerOutput, PendingStep]
    ) -> list[RequestOutput]:
        """Wait for a launched step's tokens and process them; if it failed, the step
        launched after it (``self._in_flight``) is dropped with it."""
        output, launched = in_flight
        timer = self.runner.timer
        with timer.phase("wait"):
            try:
                result = launched.result()  # waits for the device
            except Exception as error:
                return self._recover(error, output)
        with timer.phase("update"):
            for request_id, token_id in result.sampled_token_ids.items():
                request = self.scheduler.get_request(request_id)
                if request is not None:  # else finished or aborted since
                    request.resolve_placeholder(token_id)
            self.scheduler.cache_blocks(output)
            self._isolation.step_succeeded(output)
            return self._process_result(result)

    def _recover(self, error: Exception, output: SchedulerOutput) -> list[RequestOutput]:
        """Drop the failed step ``output`` and the one in flight; isolate their requests."""
        failed = [output] if self._in_flight is None else [output, self._in_flight[0]]
        self._in_flight = None
        self._isolation.step_failed(error, failed)  # raises if the engine cannot go on
        return []

    def _prompt_logprobs_ids(self, output: SchedulerOutput) -> frozenset[str]:
        """The scheduled requests that asked for prompt logprobs."""
        return frozenset(
            s.request.request_id
            for s in output.scheduled
            if s.request.sampling_params.prompt_logprobs is not None
        )

    def _process_result(self, result: StepResult) -> list[RequestOutput]:
        """Hand the step's tokens to the output processor; finish stopped requests."""
        for request_id, (first_position, entries) in result.prompt_logprobs.items():
            self.output_processor.add_prompt_logprobs(request_id, first_position, entries)
        self.num_generated_tokens += len(result.sampled_token_ids)
        for request_id, token_id in result.sampled_token_ids.items():
            request = self.scheduler.get_request(request_id)
            if request is None:
                continue
            logprobs = result.logprobs.get(request_id)
            verified = result.verified.get(request_id)
            try:
                if verified is None:
                    status = self.output_processor.process_token(request, token_id, logprobs)
                else:  # speculative decoding: the accepted drafts precede the token
                    self.num_generated_tokens += len(verified.accepted_token_ids)
                    status = self.output_processor.process_tokens(
                        request,
                        [*verified.accepted_token_ids, token_id],
                        [*verified.accepted_logprobs, logprobs],
                    )
            except Exception as error:  # its own tokens or text: it fails alone
                self.fail_request(request_id_of(request), error)
                continue
            if status is not None:
                self._finish(request_id, status)
        return self.output_processor.collect_outputs(self.scheduler.stats())
