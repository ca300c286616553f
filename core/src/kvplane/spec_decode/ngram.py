"""The ``ngram`` proposer (prompt lookup decoding): the tokens that followed the latest
earlier occurrence of the request's last ``n`` tokens, in its prompt or its output.

Free to run and strong where the output repeats its input (summaries that quote, code
edits, retrieval answers); it drafts nothing where no n-gram repeats.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from kvplane.scheduler.request import Request
from kvplane.spec_decode.base import Proposer


class NgramProposer(Proposer):
    """Matches the longest suffix of ``prompt_lookup_max`` down to ``prompt_lookup_min``
    tokens (vLLM's keys) and drafts up to ``num_speculative_tokens`` tokens. Stateless."""

    method = "ngram"

    def __init__(self, num_speculative_tokens: int, min_n: int, max_n: int) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(
                f"need 1 <= prompt_lookup_min <= prompt_lookup_max, got {min_n}, {max_n}"
            )
        self.num_speculative_tokens = num_speculative_tokens
        self.min_n = min_n
        self.max_n = max_n

    def propose(
        self, requests: Sequence[Request], max_num_tokens: Sequence[int]
    ) -> list[list[int]]:
        return [
            propose_ngram(
                request.all_token_ids,
                self.min_n,
                self.max_n,
                min(limit, self.num_speculative_tokens),
            )
            for request, limit in zip(requests, max_num_tokens, strict=True)
        ]


def propose_ngram(token_ids: Sequence[int], min_n: int, max_n: int, num_tokens: int) -> list[int]:
    """Up to ``num_tokens`` tokens that followed the latest earlier occurrence of the
    longest suffix of ``token_ids`` of ``max_n`` down to ``min_n`` tokens; [] if none."""
    length = len(token_ids)
    if num_tokens <= 0 or length < min_n + 1:
        return []
    tokens = np.asarray(token_ids, dtype=np.int64)  # [length]
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        # Windows that start before the suffix itself: [length - n, n]
        windows = sliding_window_view(tokens[:-1], n)
        matches = np.flatnonzero((windows == tokens[length - n :]).all(axis=1))
        if len(matches):
            start = int(matches[-1]) + n  # the token after the latest match
            return tokens[start : start + num_tokens].tolist()
    return []
