"""Per-request text, logprobs and finish reasons; builds the engine's RequestOutputs.

Runs on the engine's thread after each step. Owns each sequence's incremental
detokenizer and applies the stop rules of :mod:`kvplane.sampling.stop`. Outputs are of
the request's :class:`~kvplane.sampling.params.RequestOutputKind`: a ``DELTA`` output
costs what is new, whatever the output's length; a ``CUMULATIVE`` one copies it all.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kvplane.engine.outputs import CompletionOutput, RequestOutput
from kvplane.sampling.detokenizer import IncrementalDetokenizer
from kvplane.sampling.logprobs import SampleLogprobs
from kvplane.sampling.params import RequestOutputKind, SamplingParams
from kvplane.sampling.stop import FINISH_LENGTH, check_stop, partial_stop_len
from kvplane.scheduler.request import Request, RequestStatus
from kvplane.scheduler.scheduler import SchedulerStats

#: The finish reason of a request the engine failed on (vLLM's name).
FINISH_ERROR = "error"


@dataclass(slots=True)
class _SequenceOutput:
    """One of a request's ``n`` sequences as the client sees it."""

    index: int
    request: Request
    detokenizer: IncrementalDetokenizer | None
    text: str = ""
    logprobs: list[SampleLogprobs] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # What earlier outputs held (delta outputs start from here).
    num_chars_sent: int = 0
    num_tokens_sent: int = 0

    def visible_text(self, stop_strings: Sequence[str]) -> str:
        """The text an output may show: while running, a tail that may still grow into a
        stop string is held back."""
        text = self.text
        if self.finish_reason is None and stop_strings:
            text = text[: len(text) - partial_stop_len(text, stop_strings)]
        return text


@dataclass(slots=True)
class _RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    sequences: list[_SequenceOutput]
    prompt_logprobs: list[SampleLogprobs | None] | None
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    changed: bool = False
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    prompt_logprobs_sent: bool = False
    error: str | None = None  # why the engine failed on this request

    @property
    def finished(self) -> bool:
        # A loop, not all(<generator>): read for every request every step.
        for sequence in self.sequences:
            if sequence.finish_reason is None:
                return False
        return True


class OutputProcessor:
    """Turns sampled tokens into text and :class:`RequestOutput`s.

    Not thread-safe: called by the engine loop only.
    """

    def __init__(self, tokenizer: Any, eos_token_ids: frozenset[int], max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self._requests: dict[str, _RequestState] = {}
        self._sequences: dict[str, tuple[_RequestState, _SequenceOutput]] = {}

    def add_request(
        self,
        request_id: str,
        prompt: str | None,
        sequences: Sequence[Request],
        params: SamplingParams,
        final_only: bool = False,
    ) -> None:
        """Track a request; with ``final_only`` only its finished output is built, whatever
        ``params.output_kind`` says."""
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        prompt_token_ids = sequences[0].prompt_token_ids
        state = _RequestState(
            request_id=request_id,
            prompt=prompt,
            prompt_token_ids=prompt_token_ids,
            params=params,
            sequences=[],
            prompt_logprobs=[None] if params.prompt_logprobs is not None else None,
            output_kind=RequestOutputKind.FINAL_ONLY if final_only else params.output_kind,
        )
        for index, request in enumerate(sequences):
            detokenizer = (
                IncrementalDetokenizer(
                    self.tokenizer,
                    prompt_token_ids,
                    skip_special_tokens=params.skip_special_tokens,
                    spaces_between_special_tokens=params.spaces_between_special_tokens,
                )
                if params.detokenize
                else None
            )
            sequence = _SequenceOutput(
                index=index,
                request=request,
                detokenizer=detokenizer,
                logprobs=[] if params.logprobs is not None else None,
                cumulative_logprob=0.0 if params.logprobs is not None else None,
            )
            state.sequences.append(sequence)
            self._sequences[request.request_id] = (state, sequence)
        self._requests[request_id] = state

    def sequence_ids(self, request_id: str) -> list[str]:
        state = self._requests.get(request_id)
        return [] if state is None else [s.request.request_id for s in state.sequences]

    def abort_request(self, request_id: str) -> None:
        state = self._requests.pop(request_id, None)
        if state is not None:
            for sequence in state.sequences:
                self._sequences.pop(sequence.request.request_id, None)

    def fail_request(self, request_id: str, error: BaseException) -> None:
        """End every unfinished sequence of ``request_id`` with ``finish_reason="error"``;
        its next output is its last and carries ``error`` (the first one, if called twice)."""
        state = self._requests.get(request_id)
        if state is None:
            return
        for sequence in state.sequences:
            if sequence.finish_reason is None:
                sequence.finish_reason = FINISH_ERROR
        if state.error is None:
            state.error = f"{type(error).__name__}: {error}"
        state.changed = True

    def add_prompt_logprobs(
        self, sequence_id: str, first_position: int, entries: list[SampleLogprobs]
    ) -> None:
        """Record prompt logprobs for prompt positions ``first_position ...``."""
        if sequence_id not in self._sequences:
            return  # aborted or failed while its step ran
        state, _ = self._sequences[sequence_id]
        if state.prompt_logprobs is None or first_position != len(state.prompt_logprobs):
            return  # recomputed after a preemption: already recorded
        for entry in entries:
            self._decode_logprob_tokens(entry)
        state.prompt_logprobs.extend(entries)

    def process_token(
        self,
        request: Request,
        token_id: int,
        logprobs: SampleLogprobs | None,
        num_output_tokens: int | None = None,
    ) -> RequestStatus | None:
        """Account for ``token_id``, just appended to ``request`` (its output token
        ``num_output_tokens - 1``; default: its last); return the status to finish it
        with, or ``None`` while it goes on."""
        state, sequence = self._sequences[request.request_id]
        state.changed = True
        if state.first_token_time is None:
            state.first_token_time = time.monotonic()
        delta = sequence.detokenizer.add_token(token_id) if sequence.detokenizer else ""
        sequence.text += delta
        if logprobs is not None and sequence.logprobs is not None:
            self._decode_logprob_tokens(logprobs)
            sequence.logprobs.append(logprobs)
            assert sequence.cumulative_logprob is not None
            sequence.cumulative_logprob += logprobs[token_id].logprob
        output_token_ids = request.output_token_ids
        if num_output_tokens is not None:
            output_token_ids = output_token_ids[:num_output_tokens]
        result = check_stop(
            state.params,
            self.eos_token_ids,
            output_token_ids,
            request.num_prompt_tokens,
            self.max_model_len,
            sequence.text,
            len(delta),
        )
        if not result.finished:
            return None
        if sequence.detokenizer is not None and result.truncated_text_len is None:
            # Release text held back for an incomplete multi-byte character.
            sequence.text += sequence.detokenizer.flush()
        if result.truncated_text_len is not None:
            sequence.text = sequence.text[: result.truncated_text_len]
        sequence.finish_reason = result.finish_reason
        sequence.stop_reason = result.stop_reason
        if result.finish_reason == FINISH_LENGTH:
            return RequestStatus.FINISHED_LENGTH
        return RequestStatus.FINISHED_STOPPED

    def process_tokens(
        self,
        request: Request,
        token_ids: Sequence[int],
        logprobs: Sequence[SampleLogprobs | None],
    ) -> RequestStatus | None:
        """:meth:`process_token` for several tokens of one step, all just appended to
        ``request`` (speculative decoding). A token that stops the request drops those
        after it from the request: they were never emitted."""
        num_before = request.num_output_tokens - len(token_ids)
        for index, (token_id, entry) in enumerate(zip(token_ids, logprobs, strict=True)):
            status = self.process_token(request, token_id, entry, num_before + index + 1)
            if status is not None:
                request.truncate_output(num_before + index + 1)
                return status
        return None

    def collect_outputs(self, stats: SchedulerStats | None = None) -> list[RequestOutput]:
        """Outputs of every request that changed since the last call (``FINAL_ONLY``
        requests: only once finished); finished requests are dropped afterwards."""
        outputs = []
        for request_id, state in list(self._requests.items()):
            if not state.changed:
                continue
            finished = state.finished
            if state.output_kind == RequestOutputKind.FINAL_ONLY and not finished:
                continue
            state.changed = False
            outputs.append(self._make_output(state, finished))
            if finished:
                self.abort_request(request_id)
        return outputs

    def _make_output(self, state: _RequestState, finished: bool) -> RequestOutput:
        delta = state.output_kind == RequestOutputKind.DELTA
        stop_strings = state.params.stop or []
        completions = [
            self._completion(sequence, stop_strings, delta) for sequence in state.sequences
        ]
        # Whole by the first output: that comes with the first token, after the prompt.
        prompt_logprobs = state.prompt_logprobs
        if delta:
            prompt_logprobs = None if state.prompt_logprobs_sent else prompt_logprobs
            state.prompt_logprobs_sent = True
        metrics = {"arrival_time": state.arrival_time}
        if state.first_token_time is not None:
            metrics["first_token_time"] = state.first_token_time
        return RequestOutput(
            request_id=state.request_id,
            prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids,
            prompt_logprobs=prompt_logprobs,
            outputs=completions,
            finished=finished,
            num_cached_tokens=state.sequences[0].request.num_cached_tokens,
            metrics=metrics,
            error=state.error,
        )

    @staticmethod
    def _completion(
        sequence: _SequenceOutput, stop_strings: Sequence[str], delta: bool
    ) -> CompletionOutput:
        """One completion's output: all of it, or (``delta``) what earlier ones lacked."""
        text = sequence.visible_text(stop_strings)
        token_ids = sequence.request.output_token_ids
        logprobs = sequence.logprobs
        first_char = first_token = 0
        if delta:
            # Held-back text never holds a stop string's start, so what was sent is a
            # prefix of the text from now on.
            first_char, first_token = sequence.num_chars_sent, sequence.num_tokens_sent
        sequence.num_chars_sent = max(len(text), sequence.num_chars_sent)
        sequence.num_tokens_sent = len(token_ids)
        return CompletionOutput(
            index=sequence.index,
            text=text[first_char:],
            token_ids=token_ids[first_token:],
            cumulative_logprob=sequence.cumulative_logprob,
            logprobs=None if logprobs is None else logprobs[first_token:],
            finish_reason=sequence.finish_reason,
            stop_reason=sequence.stop_reason,
        )

    def _decode_logprob_tokens(self, entry: SampleLogprobs) -> None:
        if self.tokenizer is None:
            return
        for token_id, logprob in entry.items():
            if logprob.decoded_token is None:
                logprob.decoded_token = self.tokenizer.decode([token_id])
