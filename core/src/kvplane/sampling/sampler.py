"""The sampler: one call per step turns the batch's last-position logits into tokens.

Every row carries its own :class:`SamplingParams`; the work is batched across rows, with
small index tensors built per step from Python lists. Processing order per row:

1. ``logit_bias``, then ``allowed_token_ids`` (everything else to ``-inf``);
2. the constraint seam: ``allowed_mask_fn`` masks, then ``logits_processors``;
3. ``min_tokens``: EOS (unless ``ignore_eos``) and ``stop_token_ids`` to ``-inf`` while
   fewer than ``min_tokens`` tokens were generated;
4. repetition, then frequency and presence penalties (see :mod:`.penalties`);
5. greedy rows (``temperature < 1e-5``) take the argmax; random rows divide by the
   temperature (not when every one is 1), softmax to float32 and call
   ``ops.top_k_top_p_sample`` with Exp(1) noise.

A seeded row draws its noise only from its own generator, a fixed amount per step, so its
tokens depend on its seed and logits alone, never on the rest of the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvplane.engine.transfer import DeviceTransfer
from kvplane.ops import Ops
from kvplane.sampling.logprobs import (
    Logprob,
    LogprobTensors,
    SampleLogprobs,
    compute_prompt_logprobs,
)
from kvplane.sampling.params import SamplingType
from kvplane.sampling.penalties import PenaltyCache, apply_penalties
from kvplane.sampling.state import (
    AllowedMaskFn,
    LogitsProcessor,
    SequenceSamplingState,
    make_generator,
)
from kvplane.sampling.working_logits import WorkingLogits, unpack_bitmask

# The smallest positive float32: keeps ``prob / noise`` finite and never 0 / 0.
_TINY = torch.finfo(torch.float32).tiny


@dataclass(frozen=True, slots=True)
class SamplerOutput:
    """One step's result, row ``i`` for ``states[i]``.

    ``logprobs[i]`` is ``None`` unless ``states[i].params.logprobs`` is set; then it holds
    the top ``logprobs`` tokens plus the sampled one (see :mod:`.logprobs`).
    """

    sampled_token_ids: list[int]
    logprobs: list[SampleLogprobs | None]


class PendingSamples:
    """Sampled tokens still on the device: :meth:`result` copies them back (once).

    The copy to host memory is queued at once through ``transfer`` (pinned memory where
    the platform has it), so reading the result later waits only for the sampling itself.
    """

    def __init__(
        self,
        sampled: torch.Tensor,  # [num_seqs] int64, on the device
        logprobs: LogprobTensors | None,
        logprob_rows: list[int],
        transfer: DeviceTransfer,
    ) -> None:
        self.sampled = sampled
        self._logprobs = logprobs
        self._logprob_rows = logprob_rows
        self._host = transfer.to_host_async(sampled)
        self._result: SamplerOutput | None = None

    def result(self) -> SamplerOutput:
        if self._result is None:
            self._result = self._collect()
        return self._result

    def _collect(self) -> SamplerOutput:
        token_ids: list[int] = self._host.wait().tolist()
        logprobs: list[SampleLogprobs | None] = [None] * len(token_ids)
        if self._logprobs is not None:
            entries = self._logprobs.to_entries()
            for row, entry in zip(self._logprob_rows, entries, strict=True):
                logprobs[row] = entry
        return SamplerOutput(token_ids, logprobs)


class Sampler:
    """Samples one token per row; stateless apart from the penalty statistics cache.

    Called by the model runner once per step, on the thread that owns the device. The
    logits are never modified; their columns past ``vocab_size`` (padding) are ignored.
    """

    def __init__(self, ops: Ops, vocab_size: int) -> None:
        if vocab_size <= 0:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        self.ops = ops
        self.vocab_size = vocab_size
        self._penalty_cache = PenaltyCache(vocab_size)

    def __call__(
        self,
        logits: torch.Tensor,  # [num_seqs, >= vocab_size] float32 or the model dtype
        states: Sequence[SequenceSamplingState],
        batch_generator: torch.Generator | None = None,
        transfer: DeviceTransfer | None = None,
    ) -> SamplerOutput:
        """Sample a token for every row; unseeded rows draw from ``batch_generator``.

        ``batch_generator=None`` uses torch's default generator of the logits' device.
        ``transfer`` moves the step's index lists to the logits' device and the tokens
        back (the model runner's, pinned where the platform can pin); ``None`` copies
        plainly, to and from whatever device the logits are on.
        """
        return self.launch(logits, states, batch_generator, transfer).result()

    def launch(
        self,
        logits: torch.Tensor,  # [num_seqs, >= vocab_size] float32 or the model dtype
        states: Sequence[SequenceSamplingState],
        batch_generator: torch.Generator | None = None,
        transfer: DeviceTransfer | None = None,
    ) -> PendingSamples:
        """Queue the sampling of every row on the device without waiting for it; the
        returned object's :meth:`PendingSamples.result` waits and brings the tokens back.
        Arguments as for :meth:`__call__`."""
        num_seqs = len(states)
        if logits.dim() != 2 or logits.shape[0] != num_seqs:
            raise ValueError(
                f"logits must be [num_seqs={num_seqs}, vocab], got {tuple(logits.shape)}"
            )
        if logits.shape[1] < self.vocab_size:
            raise ValueError(
                f"logits have {logits.shape[1]} columns, fewer than vocab_size={self.vocab_size}"
            )
        if transfer is None:
            transfer = DeviceTransfer(logits.device, pin_memory=False)
        if num_seqs == 0:
            return PendingSamples(logits.new_zeros(0, dtype=torch.int64), None, [], transfer)
        raw_logits = logits[:, : self.vocab_size]  # [num_seqs, vocab_size]
        work = WorkingLogits(raw_logits)
        self._apply_bias_and_allowed(work, states, transfer)
        self._apply_constraints(work, states, transfer)
        self._apply_min_tokens(work, states, transfer)
        self._apply_penalties(work, states, transfer)
        sampled = self._sample(work.read(), states, batch_generator, transfer)  # [num_seqs]
        rows = [row for row, state in enumerate(states) if state.params.logprobs is not None]
        logprobs = None
        if rows:
            index = _int64(rows, transfer)
            num_top = [states[row].params.logprobs or 0 for row in rows]
            logprobs = LogprobTensors.compute(
                raw_logits.index_select(0, index), sampled.index_select(0, index), num_top
            )
        return PendingSamples(sampled, logprobs, rows, transfer)

    # ----------------------------------------------------------------------------------
    # Logits processing (in place on the float32 working copy, made by the first write)
    # ----------------------------------------------------------------------------------

    def _apply_bias_and_allowed(
        self,
        work: WorkingLogits,
        states: Sequence[SequenceSamplingState],
        transfer: DeviceTransfer,
    ) -> None:
        bias_rows: list[int] = []
        bias_ids: list[int] = []
        bias_values: list[float] = []
        allowed_rows: list[int] = []
        allowed_ids: list[int] = []
        for row, state in enumerate(states):
            params = state.params
            if params.logit_bias:
                bias_rows.extend([row] * len(params.logit_bias))
                bias_ids.extend(params.logit_bias.keys())
                bias_values.extend(params.logit_bias.values())
            if params.allowed_token_ids is not None:
                allowed_rows.extend([row] * len(params.allowed_token_ids))
                allowed_ids.extend(params.allowed_token_ids)
        if bias_ids:
            work.write().index_put_(
                (_int64(bias_rows, transfer), _int64(bias_ids, transfer)),
                _float32(bias_values, transfer),
                accumulate=True,
            )
        if allowed_ids:
            logits = work.write()  # [num_seqs, vocab_size]
            rows = _int64(allowed_rows, transfer)
            disallowed = torch.zeros_like(logits, dtype=torch.bool)  # [num_seqs, vocab]
            disallowed[rows] = True
            disallowed[rows, _int64(allowed_ids, transfer)] = False
            logits.masked_fill_(disallowed, float("-inf"))

    def _apply_constraints(
        self,
        work: WorkingLogits,
        states: Sequence[SequenceSamplingState],
        transfer: DeviceTransfer,
    ) -> None:
        mask_rows: list[int] = []
        masks: list[torch.Tensor] = []  # each [vocab_size] bool
        packed_rows: list[int] = []
        packed_masks: list[torch.Tensor] = []  # each [ceil(vocab_size / 32)] int32
        for row, state in enumerate(states):
            if state.allowed_mask_fn is not None:
                mask = state.allowed_mask_fn(state.output_token_ids)
                if mask is None:
                    continue
                if mask.dtype == torch.int32:
                    packed_rows.append(row)
                    packed_masks.append(mask)
                else:
                    mask_rows.append(row)
                    masks.append(mask)
        device = work.read().device
        parts: list[torch.Tensor] = []  # each [rows, vocab_size] bool
        if masks:
            parts.append(torch.stack(masks).to(device, torch.bool))
        if packed_masks:
            packed = torch.stack(packed_masks).to(device)  # [rows, ceil(vocab_size / 32)]
            parts.append(unpack_bitmask(packed, self.vocab_size))
        if parts:
            allowed = torch.cat(parts)  # [rows, vocab_size] bool
            rows = _int64(mask_rows + packed_rows, transfer)
            logits = work.write()  # [num_seqs, vocab_size]
            logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))
        for row, state in enumerate(states):
            for processor in state.logits_processors:
                logits = work.write()
                logits[row] = processor(state.output_token_ids, logits[row])

    def _apply_min_tokens(
        self,
        work: WorkingLogits,
        states: Sequence[SequenceSamplingState],
        transfer: DeviceTransfer,
    ) -> None:
        rows: list[int] = []
        token_ids: list[int] = []
        for row, state in enumerate(states):
            params = state.params
            if len(state.output_token_ids) >= params.min_tokens:
                continue
            # With ignore_eos, EOS cannot end the sequence, so it need not be blocked.
            blocked = set(params.stop_token_ids or ())
            if not params.ignore_eos:
                blocked |= state.eos_token_ids
            rows.extend([row] * len(blocked))
            token_ids.extend(blocked)
        if token_ids:
            work.write()[_int64(rows, transfer), _int64(token_ids, transfer)] = float("-inf")

    def _apply_penalties(
        self,
        work: WorkingLogits,
        states: Sequence[SequenceSamplingState],
        transfer: DeviceTransfer,
    ) -> None:
        rows = [row for row, state in enumerate(states) if state.params.has_penalties]
        if not rows:
            return
        penalised_states = [states[row] for row in rows]
        output_counts, prompt_mask = self._penalty_cache.gather(penalised_states, transfer)
        params = [state.params for state in penalised_states]
        index = _int64(rows, transfer)
        logits = work.write()  # [num_seqs, vocab_size]
        penalised = apply_penalties(
            logits.index_select(0, index),
            output_counts,
            prompt_mask,
            _float32([p.repetition_penalty for p in params], transfer),
            _float32([p.presence_penalty for p in params], transfer),
            _float32([p.frequency_penalty for p in params], transfer),
        )
        logits[index] = penalised

    # ----------------------------------------------------------------------------------
    # Sampling and logprobs
    # ----------------------------------------------------------------------------------

    def _sample(
        self,
        logits: torch.Tensor,  # [num_seqs, vocab_size] float32, processed
        states: Sequence[SequenceSamplingState],
        batch_generator: torch.Generator | None,
        transfer: DeviceTransfer,
    ) -> torch.Tensor:  # [num_seqs] int64
        random_rows = [
            row
            for row, state in enumerate(states)
            if state.params.sampling_type != SamplingType.GREEDY
        ]
        if not random_rows:
            return logits.argmax(dim=-1)
        if len(random_rows) == len(states):
            return self._sample_random(logits, states, batch_generator, transfer)
        sampled = logits.argmax(dim=-1)  # greedy rows keep theirs
        index = _int64(random_rows, transfer)
        sampled[index] = self._sample_random(
            logits.index_select(0, index),
            [states[row] for row in random_rows],
            batch_generator,
            transfer,
        )
        return sampled

    def _sample_random(
        self,
        logits: torch.Tensor,  # [n, vocab_size] float32
        states: Sequence[SequenceSamplingState],
        batch_generator: torch.Generator | None,
        transfer: DeviceTransfer,
    ) -> torch.Tensor:  # [n] int64
        params = [state.params for state in states]
        if all(p.temperature == 1.0 for p in params):
            # [n, vocab]; no division: a full pass over the logits that changes nothing
            probs = torch.softmax(logits, dim=-1)
        else:
            temperatures = _float32([p.temperature for p in params], transfer)
            probs = torch.softmax(logits / temperatures.unsqueeze(1), dim=-1)  # [n, vocab]
        top_k = (
            _int64([p.top_k for p in params], transfer)
            if any(p.top_k > 0 for p in params)
            else None
        )
        top_p = (
            _float32([p.top_p for p in params], transfer)
            if any(p.top_p < 1.0 for p in params)
            else None
        )
        min_p = (
            _float32([p.min_p for p in params], transfer)
            if any(p.min_p > 0.0 for p in params)
            else None
        )
        noise = self._exponential_noise(states, logits.device, batch_generator, transfer)
        return self.ops.top_k_top_p_sample(probs, top_k, top_p, min_p, noise)

    def _exponential_noise(
        self,
        states: Sequence[SequenceSamplingState],
        device: torch.device,
        batch_generator: torch.Generator | None,
        transfer: DeviceTransfer,
    ) -> torch.Tensor:  # [n, vocab_size] float32, Exp(1)
        noise = torch.empty(len(states), self.vocab_size, dtype=torch.float32, device=device)
        seeded_rows = [row for row, state in enumerate(states) if state.params.seed is not None]
        if len(seeded_rows) < len(states):
            if not seeded_rows:
                noise.exponential_(generator=batch_generator)
            else:
                seeded = set(seeded_rows)
                unseeded = [row for row in range(len(states)) if row not in seeded]
                shared = torch.empty(
                    len(unseeded), self.vocab_size, dtype=torch.float32, device=device
                )
                noise[_int64(unseeded, transfer)] = shared.exponential_(generator=batch_generator)
        # One generator per seeded row: inherently a loop, one kernel per seeded row.
        for row in seeded_rows:
            state = states[row]
            if state.generator is None:
                assert state.params.seed is not None
                state.generator = make_generator(state.params.seed, device)
            noise[row].exponential_(generator=state.generator)
        return noise.clamp_(min=_TINY)


def _int64(values: Sequence[int], transfer: DeviceTransfer) -> torch.Tensor:  # [len(values)]
    return transfer.to_device(values, torch.int64)


def _float32(values: Sequence[float], transfer: DeviceTransfer) -> torch.Tensor:  # [len(values)]
    return transfer.to_device(values, torch.float32)


# Logprob, SampleLogprobs and compute_prompt_logprobs live in .logprobs, the per-sequence
# state in .state; re-exported here so the sampler's public surface is one module.
__all__ = [
    "AllowedMaskFn",
    "LogitsProcessor",
    "Logprob",
    "PendingSamples",
    "SampleLogprobs",
    "Sampler",
    "SamplerOutput",
    "SequenceSamplingState",
    "compute_prompt_logprobs",
    "make_generator",
    "unpack_bitmask",
]
