"""One sequence's grammar state: the :data:`~kvplane.sampling.sampler.AllowedMaskFn` it uses.

A :class:`GrammarConstraint` wraps an ``xgrammar.GrammarMatcher``. The sampler calls it once
per sampling step with the sequence's live ``output_token_ids``; it first feeds the matcher
the tokens appended since its last call (output tokens are only ever appended, also across
preemption, so a count of tokens fed is all the state needed), then returns the packed
bitmask of the tokens allowed next. The sampler stacks the bitmasks of all constrained rows,
copies them to the device at once and applies them in one batched kernel.

EOS (the engine's EOS ids, the grammar's stop tokens) is allowed exactly when the text so far
is a complete match; once nothing but the end can follow, only EOS is allowed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

logger = logging.getLogger(__name__)

#: Tokens per packed word: bit ``j`` of word ``i`` stands for token ``32 * i + j``.
BITS_PER_WORD = 32


def num_bitmask_words(vocab_size: int) -> int:
    """Length of a packed bitmask row for ``vocab_size`` tokens."""
    return (vocab_size + BITS_PER_WORD - 1) // BITS_PER_WORD


class GrammarConstraint:
    """A per-sequence matcher over one compiled grammar; call it as an ``allowed_mask_fn``.

    Not thread-safe; owned by one sequence and called by the sampler on the engine thread.
    Returns ``None`` (no constraint this step) once the grammar has ended (EOS accepted, only
    reachable with ``ignore_eos``) or when a token outside the grammar was appended (only
    possible when another constraint left no allowed token): the sequence then goes on
    unconstrained rather than stalling, and a warning is logged once.
    """

    def __init__(self, compiled_grammar: Any, vocab_size: int) -> None:
        import xgrammar

        self._matcher = xgrammar.GrammarMatcher(compiled_grammar)
        self.vocab_size = vocab_size
        self._num_words = num_bitmask_words(vocab_size)
        self._num_fed = 0
        self.is_failed = False

    @property
    def num_tokens_fed(self) -> int:
        """How many output tokens the matcher has consumed."""
        return self._num_fed

    @property
    def is_terminated(self) -> bool:
        """Whether the matcher accepted an EOS: the grammar has ended."""
        return bool(self._matcher.is_terminated())

    @property
    def is_completed(self) -> bool:
        """Whether the tokens fed so far form a complete match (EOS would be allowed)."""
        return bool(self._matcher.is_completed())

    def advance(self, output_token_ids: Sequence[int]) -> None:
        """Feed the tokens appended to ``output_token_ids`` since the last call."""
        if len(output_token_ids) < self._num_fed:
            raise ValueError(
                f"output_token_ids shrank from {self._num_fed} to {len(output_token_ids)} "
                "tokens; a grammar constraint needs an append-only list"
            )
        new_tokens = output_token_ids[self._num_fed :]
        self._num_fed = len(output_token_ids)
        if self.is_failed:
            return
        for token_id in new_tokens:
            if self._matcher.is_terminated() or not self._matcher.accept_token(int(token_id)):
                if not self._matcher.is_terminated():
                    self.is_failed = True
                    logger.warning(
                        "token %d is outside the grammar; the rest of this sequence is "
                        "unconstrained",
                        token_id,
                    )
                return

    def __call__(self, output_token_ids: Sequence[int]) -> torch.Tensor | None:  # [num_words]
        """Packed int32 bitmask of the tokens allowed next, or ``None`` for no constraint."""
        self.advance(output_token_ids)
        if self.is_failed or self._matcher.is_terminated():
            return None
        bitmask = torch.empty(1, self._num_words, dtype=torch.int32)  # [1, num_words]
        needs_apply = self._matcher.fill_next_token_bitmask(bitmask)
        if not needs_apply:
            return None
        return bitmask[0]
