"""The rejection sampler's host side: accepted prefixes, bonus tokens, logprobs, and the
seeded generator put back to one draw per emitted token."""

from __future__ import annotations

import torch

from kvplane.sampling.params import SamplingParams
from kvplane.sampling.state import SequenceSamplingState, make_generator
from kvplane.spec_decode.verification import DraftVerification, num_accepted

VOCAB = 16


def test_num_accepted_is_the_agreeing_prefix() -> None:
    assert num_accepted([1, 2, 3], [1, 2, 3, 4]) == 3
    assert num_accepted([1, 2, 3], [1, 5, 3, 4]) == 1
    assert num_accepted([1, 2, 3], [0, 2, 3, 4]) == 0
    assert num_accepted([], [7]) == 0


def _state(seed: int | None, temperature: float = 1.0) -> SequenceSamplingState:
    params = SamplingParams(temperature=temperature, seed=seed)
    generator = None if seed is None else make_generator(seed, "cpu")
    return SequenceSamplingState(params, [0], [], generator=generator)


def test_split_emits_accepted_drafts_then_the_sample() -> None:
    states = {"a": _state(None), "b": _state(None), "c": _state(None, temperature=0.0)}
    drafts = {"a": (5, 6), "c": (1,)}
    verification = DraftVerification(drafts, states, VOCAB)
    # Rows: a (3: last token, 2 drafts), b (1), c (2).
    rows = ("a", "a", "a", "b", "c", "c")
    tokens = [5, 7, 9, 4, 1, 3]
    logprobs = [{5: 0.5}, {7: 0.7}, None, None, {1: 0.1}, {3: 0.3}]
    result = verification.split(rows, tokens, logprobs)  # type: ignore[arg-type]
    assert [(r, t) for r, t, _, _ in result] == [("a", 7), ("b", 4), ("c", 3)]
    a, b, c = (verified for _, _, _, verified in result)
    assert a is not None and a.accepted_token_ids == (5,) and a.num_draft_tokens == 2
    assert a.accepted_logprobs == ({5: 0.5},)
    assert result[0][2] == {7: 0.7}  # the sampled token's own logprobs
    assert b is None
    assert c is not None and c.accepted_token_ids == (1,)  # all accepted: 3 is the bonus


def test_seeded_generator_rewinds_to_the_emitted_tokens() -> None:
    """After a step that drew 4 rows but emitted 2 tokens, the generator stands where 2
    draws leave it: the next position gets the noise it would get without drafts."""
    state = _state(seed=7)
    verification = DraftVerification({"a": (1, 2, 3)}, {"a": state}, VOCAB)
    assert state.generator is not None
    for _ in range(4):  # what the sampler draws: one [vocab] row per sampled row
        torch.empty(VOCAB).exponential_(generator=state.generator)
    verification.split(("a",) * 4, [1, 9, 9, 9], [None] * 4)
    reference = make_generator(7, "cpu")
    for _ in range(2):
        torch.empty(VOCAB).exponential_(generator=reference)
    expected = torch.empty(VOCAB).exponential_(generator=reference)
    assert torch.equal(torch.empty(VOCAB).exponential_(generator=state.generator), expected)
