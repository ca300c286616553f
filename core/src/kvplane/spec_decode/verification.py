"""Verifying draft tokens in the target model's forward: the rejection sampler.

A request with ``k`` draft tokens ``d_0 .. d_{k-1}`` is computed in one forward with its
last known token and gets ``k + 1`` sampled rows: row ``i`` is the target's distribution
``p_i`` after the drafts before it, processed as any row is (bias, temperature, top-k,
top-p, min-p) and sampled with the noise the request would draw for that output position
without speculation. The request keeps the leading drafts its samples agree with, then
the sample at the first disagreement (the bonus sample after the last draft when every
draft agrees): between 1 and ``k + 1`` tokens per step.

Why the output is exactly the target's: the proposers are deterministic (the n-gram
lookup, the draft model's argmax), so the proposal distribution ``q`` is one-hot on
``d_i``. Rejection sampling then accepts ``d_i`` with probability ``min(1, p_i(d_i) /
q_i(d_i)) = p_i(d_i)`` and otherwise samples from ``max(0, p_i - q_i)`` renormalised,
which is ``p_i`` without ``d_i``. Drawing ``t ~ p_i`` and accepting exactly when ``t ==
d_i`` has the same joint law (accept with ``p_i(d_i)``; given a rejection, ``t`` is
``p_i`` conditioned on ``t != d_i``), and every kept row was conditioned on the tokens
actually emitted before it. Greedy rows accept while the argmax equals the draft.

Per-request seeds: the seeded generator is put back, after the step, to where it stands
after one draw per emitted token, so a seeded request draws the same noise for the same
output position with or without speculation, whatever was drafted or rejected.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from kvplane.sampling.logprobs import SampleLogprobs
from kvplane.sampling.params import SamplingType
from kvplane.sampling.state import SequenceSamplingState


@dataclass(frozen=True, slots=True)
class VerifiedDrafts:
    """What one request's draft tokens came to in a step.

    ``accepted_token_ids`` (with their logprobs, where asked for) precede the step's
    sampled token in the output.
    """

    num_draft_tokens: int
    accepted_token_ids: tuple[int, ...]
    accepted_logprobs: tuple[SampleLogprobs | None, ...]


def num_accepted(draft_token_ids: Sequence[int], sampled_token_ids: Sequence[int]) -> int:
    """How many leading drafts the samples (one per draft, and the bonus one) agree with."""
    count = 0
    for draft, sampled in zip(draft_token_ids, sampled_token_ids, strict=False):
        if draft != sampled:
            break
        count += 1
    return count


class DraftVerification:
    """Made at launch of a step with draft tokens (before its sampling draws noise);
    :meth:`split` turns the step's sampled rows into each request's emitted tokens.

    ``draft_token_ids`` and ``sample_request_ids`` are the step's inputs' (a request with
    drafts has ``1 + len(drafts)`` consecutive rows). Called on the engine's thread.
    """

    def __init__(
        self,
        draft_token_ids: Mapping[str, tuple[int, ...]],
        states: Mapping[str, SequenceSamplingState],
        vocab_size: int,
    ) -> None:
        self.draft_token_ids = draft_token_ids
        self.vocab_size = vocab_size
        # Seeded random requests: their generator and its state before this step's draws.
        self._generators: dict[str, tuple[torch.Generator, torch.Tensor]] = {}
        for request_id in draft_token_ids:
            state = states[request_id]
            is_random = state.params.sampling_type != SamplingType.GREEDY
            if is_random and state.generator is not None:
                self._generators[request_id] = (state.generator, state.generator.get_state())

    def split(
        self,
        sample_request_ids: Sequence[str],
        sampled_token_ids: Sequence[int],
        logprobs: Sequence[SampleLogprobs | None],
    ) -> list[tuple[str, int, SampleLogprobs | None, VerifiedDrafts | None]]:
        """Per request sampled this step: ``(request id, its sampled token, that token's
        logprobs, what its drafts came to or None)``; seeded generators are rewound."""
        results: list[tuple[str, int, SampleLogprobs | None, VerifiedDrafts | None]] = []
        row = 0
        while row < len(sample_request_ids):
            request_id = sample_request_ids[row]
            drafts = self.draft_token_ids.get(request_id)
            if drafts is None:
                results.append((request_id, sampled_token_ids[row], logprobs[row], None))
                row += 1
                continue
            rows = range(row, row + len(drafts) + 1)
            count = num_accepted(drafts, [sampled_token_ids[r] for r in rows])
            verified = VerifiedDrafts(
                num_draft_tokens=len(drafts),
                accepted_token_ids=drafts[:count],
                accepted_logprobs=tuple(logprobs[r] for r in rows[:count]),
            )
            last = rows[count]
            results.append((request_id, sampled_token_ids[last], logprobs[last], verified))
            self._rewind(request_id, count + 1)
            row = rows.stop
        return results

    def _rewind(self, request_id: str, num_draws: int) -> None:
        """Put a seeded generator where ``num_draws`` draws from this step's start leave it
        (the sampler drew one ``[vocab_size]`` row of noise per sampled row)."""
        entry = self._generators.get(request_id)
        if entry is None:
            return
        generator, state = entry
        generator.set_state(state)
        for _ in range(num_draws):
            noise = torch.empty(self.vocab_size, dtype=torch.float32, device=generator.device)
            noise.exponential_(generator=generator)
