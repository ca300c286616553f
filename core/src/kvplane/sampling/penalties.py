"""Repetition, presence and frequency penalties, with token statistics kept on device.

A sequence that uses a penalty gets a row in a :class:`PenaltyCache` the first time it is
sampled: its prompt's token set (for the repetition penalty) and its output token counts.
Each step only the tokens appended since the previous step are added, in one batched
kernel, so the per-step cost does not grow with the sequence length. The row is released
when the sequence's state object is garbage-collected.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from kvplane.engine.transfer import DeviceTransfer


class PenaltyStateLike(Protocol):
    """What the cache reads from a sequence's state (``SequenceSamplingState`` has it)."""

    prompt_token_ids: list[int]
    output_token_ids: list[int]


@dataclass(slots=True)
class _Entry:
    slot: int
    num_counted: int  # output tokens already in the slot's counts


class PenaltyCache:
    """Device-resident token statistics, one slot per live sequence that uses penalties.

    Contract: a state's ``output_token_ids`` only grows between calls. If it shrinks (a
    rollback) the slot is recounted from scratch; rewriting tokens in place without
    changing the length is not detected. Not thread-safe: one sampler, one thread.
    """

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self._entries: dict[int, _Entry] = {}  # id(state) -> entry
        self._free_slots: list[int] = []
        self._output_counts: torch.Tensor | None = None  # [capacity, vocab_size] int32
        self._prompt_mask: torch.Tensor | None = None  # [capacity, vocab_size] bool

    @property
    def num_slots_in_use(self) -> int:
        return len(self._entries)

    def gather(
        self,
        states: Sequence[PenaltyStateLike],
        transfer: DeviceTransfer,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # [n, vocab] int32 counts, [n, vocab] bool
        """Bring each state's slot up to date and return its (output counts, prompt mask).

        Allocates slots (on ``transfer.device``) for states seen for the first time;
        ``transfer`` moves the step's token and slot lists there. Returns copies, row
        ``i`` belonging to ``states[i]``.
        """
        device = transfer.device
        new_slots: list[int] = []  # zero counts and prompt mask, then fill both
        recount_slots: list[int] = []  # output rolled back: zero counts, refill
        prompt_rows: list[int] = []
        prompt_tokens: list[int] = []
        count_rows: list[int] = []
        count_tokens: list[int] = []
        slots: list[int] = []
        for state in states:
            entry = self._entries.get(id(state))
            outputs = state.output_token_ids
            if entry is None:
                entry = self._allocate(state, device)
                new_slots.append(entry.slot)
                unique_prompt = set(state.prompt_token_ids)
                prompt_rows.extend([entry.slot] * len(unique_prompt))
                prompt_tokens.extend(unique_prompt)
            elif len(outputs) < entry.num_counted:
                recount_slots.append(entry.slot)
                entry.num_counted = 0
            fresh = outputs[entry.num_counted :]
            count_rows.extend([entry.slot] * len(fresh))
            count_tokens.extend(fresh)
            entry.num_counted = len(outputs)
            slots.append(entry.slot)

        counts, mask = self._output_counts, self._prompt_mask
        assert counts is not None and mask is not None
        if new_slots or recount_slots:
            counts.index_fill_(0, _index(new_slots + recount_slots, transfer), 0)
        if new_slots:
            mask.index_fill_(0, _index(new_slots, transfer), False)
        if prompt_tokens:
            mask[_index(prompt_rows, transfer), _index(prompt_tokens, transfer)] = True
        if count_tokens:
            counts.index_put_(
                (_index(count_rows, transfer), _index(count_tokens, transfer)),
                torch.ones(len(count_tokens), dtype=counts.dtype, device=device),
                accumulate=True,
            )
        rows = _index(slots, transfer)
        return counts.index_select(0, rows), mask.index_select(0, rows)

    def _allocate(self, state: PenaltyStateLike, device: torch.device) -> _Entry:
        if not self._free_slots:
            self._grow(device)
        entry = _Entry(slot=self._free_slots.pop(), num_counted=0)
        key = id(state)
        self._entries[key] = entry
        # The slot lives exactly as long as the state object: no release call to forget.
        weakref.finalize(state, self._release, key)
        return entry

    def _release(self, key: int) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._free_slots.append(entry.slot)

    def _grow(self, device: torch.device) -> None:
        old_capacity = 0 if self._output_counts is None else self._output_counts.shape[0]
        capacity = max(8, 2 * old_capacity)
        counts = torch.zeros(capacity, self.vocab_size, dtype=torch.int32, device=device)
        mask = torch.zeros(capacity, self.vocab_size, dtype=torch.bool, device=device)
        if self._output_counts is not None and self._prompt_mask is not None:
            counts[:old_capacity] = self._output_counts
            mask[:old_capacity] = self._prompt_mask
        self._output_counts, self._prompt_mask = counts, mask
        # Hand out low slots first so the pool stays dense.
        self._free_slots.extend(range(capacity - 1, old_capacity - 1, -1))


def _index(values: list[int], transfer: DeviceTransfer) -> torch.Tensor:  # [len(values)] int64
    return transfer.to_device(values, torch.int64)


def apply_penalties(
    logits: torch.Tensor,  # [n, vocab_size] float32
    output_counts: torch.Tensor,  # [n, vocab_size] int32, occurrences in the output
    prompt_mask: torch.Tensor,  # [n, vocab_size] bool, token occurs in the prompt
    repetition_penalties: torch.Tensor,  # [n] float32, 1.0 = off
    presence_penalties: torch.Tensor,  # [n] float32, 0.0 = off
    frequency_penalties: torch.Tensor,  # [n] float32, 0.0 = off
) -> torch.Tensor:  # [n, vocab_size]
    """Return penalised logits (a new tensor).

    Repetition (HF / CTRL semantics) over prompt and output tokens: positive logits are
    divided by the penalty, negative ones multiplied. Then OpenAI semantics over output
    tokens only: ``logit -= frequency * count + presence * (count > 0)``.
    """
    output_mask = output_counts > 0
    repetition = repetition_penalties.unsqueeze(1)  # [n, 1]
    penalised = torch.where(logits > 0, logits / repetition, logits * repetition)
    logits = torch.where(output_mask | prompt_mask, penalised, logits)
    logits = logits - frequency_penalties.unsqueeze(1) * output_counts
    return logits - presence_penalties.unsqueeze(1) * output_mask
