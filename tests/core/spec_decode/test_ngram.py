"""The n-gram proposer: the longest repeated suffix, its latest occurrence, the limits."""

from __future__ import annotations

from kvplane.scheduler.request import Request
from kvplane.spec_decode.ngram import NgramProposer, propose_ngram


def test_drafts_what_followed_the_suffix() -> None:
    tokens = [1, 2, 3, 4, 5, 6, 9, 1, 2, 3]
    assert propose_ngram(tokens, 2, 3, 3) == [4, 5, 6]
    assert propose_ngram(tokens, 2, 3, 10) == [4, 5, 6, 9, 1, 2, 3]  # up to the end


def test_longest_match_wins_then_latest_occurrence() -> None:
    # "3" at 0 is followed by 7, "2 3" at 4 by 9: the longer n-gram wins.
    tokens = [3, 7, 8, 0, 2, 3, 9, 5, 2, 3]
    assert propose_ngram(tokens, 1, 2, 1) == [9]
    assert propose_ngram(tokens, 1, 1, 1) == [9]  # latest "3" (at 5), not the first
    assert propose_ngram([4, 1, 4, 2, 4], 1, 1, 2) == [2, 4]


def test_nothing_without_a_match_or_room() -> None:
    assert propose_ngram([1, 2, 3, 4], 1, 3, 4) == []
    assert propose_ngram([1, 2, 1, 2], 3, 3, 2) == []  # only shorter n-grams repeat
    assert propose_ngram([5], 1, 1, 3) == []
    assert propose_ngram([1, 1, 1], 1, 2, 0) == []


def test_proposer_respects_each_request_limit() -> None:
    proposer = NgramProposer(num_speculative_tokens=4, min_n=1, max_n=2)
    requests = [
        Request("a", [1, 2, 3, 4, 5, 1, 2], None, 0.0),
        Request("b", [7, 8, 9], None, 0.0),
    ]
    assert proposer.propose(requests, [2, 4]) == [[3, 4], []]
    assert proposer.propose(requests[:1], [8]) == [[3, 4, 5, 1]]  # num_speculative_tokens
