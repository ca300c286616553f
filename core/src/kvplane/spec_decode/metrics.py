"""Speculative-decoding counters: drafts verified, draft tokens, accepted tokens."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from kvplane.spec_decode.verification import VerifiedDrafts


@dataclass(frozen=True, slots=True)
class SpecDecodeStats:
    """Totals since the engine started, for one method (vLLM's counters).

    ``num_drafts``: requests' steps that verified draft tokens; ``num_draft_tokens``:
    the tokens drafted in them; ``num_accepted_tokens``: those kept;
    ``num_accepted_tokens_per_pos[i]``: steps that kept the draft at position ``i``.
    """

    method: str
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_accepted_tokens_per_pos: tuple[int, ...] = ()

    @property
    def acceptance_rate(self) -> float:
        """Accepted / drafted tokens (0.0 before any draft)."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens a step with drafts emits per request on average, its sampled one
        included (vLLM's "mean acceptance length"; 1.0 is no gain; 0.0 before any draft)."""
        if not self.num_drafts:
            return 0.0
        return 1.0 + self.num_accepted_tokens / self.num_drafts

    def as_dict(self, prefix: str = "spec_decode_") -> dict[str, float | int | str]:
        """Flat keys for result files (``spec_decode_acceptance_rate``, ...)."""
        return {
            f"{prefix}method": self.method,
            f"{prefix}num_drafts": self.num_drafts,
            f"{prefix}num_draft_tokens": self.num_draft_tokens,
            f"{prefix}num_accepted_tokens": self.num_accepted_tokens,
            f"{prefix}acceptance_rate": self.acceptance_rate,
            f"{prefix}mean_accepted_length": self.mean_accepted_length,
        }


class SpecDecodeMetrics:
    """Accumulates :class:`SpecDecodeStats` step by step (the engine's thread only)."""

    def __init__(self, method: str, num_speculative_tokens: int) -> None:
        self.method = method
        self.num_speculative_tokens = num_speculative_tokens
        self.reset()

    def record(self, verified: Iterable[VerifiedDrafts]) -> None:
        for drafts in verified:
            num_accepted = len(drafts.accepted_token_ids)
            self.num_drafts += 1
            self.num_draft_tokens += drafts.num_draft_tokens
            self.num_accepted_tokens += num_accepted
            for position in range(num_accepted):
                self.per_position[position] += 1

    def reset(self) -> None:
        """Start counting afresh (benchmarks, after their warm-up)."""
        self.num_drafts = 0
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self.per_position = [0] * self.num_speculative_tokens

    def stats(self) -> SpecDecodeStats:
        return SpecDecodeStats(
            self.method,
            self.num_drafts,
            self.num_draft_tokens,
            self.num_accepted_tokens,
            tuple(self.per_position),
        )
