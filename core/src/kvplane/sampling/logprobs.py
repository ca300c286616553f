"""Log-probabilities in vLLM's shape: per position, a dict from token id to :class:`Logprob`.

Values come from the raw model distribution ``log_softmax(logits)``, before any penalty,
bias, mask or temperature; ``rank`` is the 1-based rank of the token in that distribution.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Bounds the float32 [rows, vocab] temporaries of compute_prompt_logprobs (~256 MiB).
_MAX_ELEMENTS_PER_CHUNK = 1 << 26


@dataclass(slots=True)
class Logprob:
    """One token's log-probability; ``decoded_token`` is filled by the detokenizing side."""

    logprob: float
    rank: int | None
    decoded_token: str | None = None


#: Token id -> its logprob at one position: the top-k tokens plus the chosen one.
SampleLogprobs = dict[int, Logprob]


def gather_logprobs(
    logits: torch.Tensor,  # [num_rows, vocab_size] raw model logits, any float dtype
    token_ids: torch.Tensor,  # [num_rows] int64, the chosen (sampled or next prompt) token
    num_top: Sequence[int],  # [num_rows] how many top tokens each row reports (>= 0)
) -> list[SampleLogprobs]:
    """Per row: the ``num_top[i]`` most likely tokens (ranks 1..k) plus ``token_ids[i]``.

    The chosen token comes first in each dict; if it is also among the top tokens it
    appears once. Its rank counts the tokens strictly more likely than it, plus one.
    Does one device-to-host copy for the whole batch.
    """
    return LogprobTensors.compute(logits, token_ids, num_top).to_entries()


@dataclass(slots=True)
class LogprobTensors:
    """:func:`gather_logprobs` split in two: the device work (:meth:`compute`, queued
    without waiting) and the host lists (:meth:`to_entries`, which waits for it)."""

    num_top: tuple[int, ...]
    token_ids: torch.Tensor  # [num_rows] int64
    chosen: torch.Tensor  # [num_rows] float32, logprob of the chosen token
    ranks: torch.Tensor  # [num_rows] int64
    top_values: torch.Tensor | None  # [num_rows, max_top] float32
    top_ids: torch.Tensor | None  # [num_rows, max_top] int64

    @classmethod
    def compute(
        cls,
        logits: torch.Tensor,  # [num_rows, vocab_size]
        token_ids: torch.Tensor,  # [num_rows] int64
        num_top: Sequence[int],
    ) -> LogprobTensors:
        assert logits.shape[0] == token_ids.shape[0] == len(num_top)
        logprobs = torch.log_softmax(logits.float(), dim=-1)  # [num_rows, vocab_size]
        chosen = logprobs.gather(1, token_ids.unsqueeze(1))  # [num_rows, 1]
        ranks = (logprobs > chosen).sum(dim=-1) + 1  # [num_rows]
        max_top = min(max(num_top, default=0), logprobs.shape[-1])
        top_values = top_ids = None
        if max_top > 0:
            top_values, top_ids = logprobs.topk(max_top, dim=-1)  # [num_rows, max_top] each
        return cls(tuple(num_top), token_ids, chosen.squeeze(1), ranks, top_values, top_ids)

    def to_entries(self) -> list[SampleLogprobs]:
        if not self.num_top:
            return []
        top_values_list: list[list[float]] = []
        top_ids_list: list[list[int]] = []
        if self.top_values is not None and self.top_ids is not None:
            top_values_list = self.top_values.tolist()
            top_ids_list = self.top_ids.tolist()
        chosen_list: list[float] = self.chosen.tolist()
        ranks_list: list[int] = self.ranks.tolist()
        token_list: list[int] = self.token_ids.tolist()
        max_top = len(top_ids_list[0]) if top_ids_list else 0
        results: list[SampleLogprobs] = []
        for row, k in enumerate(self.num_top):
            entry: SampleLogprobs = {token_list[row]: Logprob(chosen_list[row], ranks_list[row])}
            for position in range(min(k, max_top)):
                token = top_ids_list[row][position]
                if token not in entry:
                    entry[token] = Logprob(top_values_list[row][position], position + 1)
            results.append(entry)
        return results


def compute_prompt_logprobs(
    logits: torch.Tensor,  # [num_positions, vocab_size] logits at prompt positions
    next_token_ids: Sequence[int],  # [num_positions] the prompt token following each one
    num_top: int,
) -> list[SampleLogprobs]:
    """Prompt logprobs: for each position, the next prompt token and the ``num_top`` best.

    The engine supplies the logits of positions ``0..P-2`` with ``next_token_ids`` the
    prompt tokens ``1..P-1``; it reports ``None`` for the first prompt token itself.
    Works in chunks of positions so a long prompt does not materialise a float32 copy of
    all its logits at once. Waits for the device (the entries are host lists).
    """
    if logits.shape[0] != len(next_token_ids):
        raise ValueError(
            f"compute_prompt_logprobs: {logits.shape[0]} logits rows but "
            f"{len(next_token_ids)} next_token_ids"
        )
    if num_top < 0:
        raise ValueError(f"num_top must be non-negative, got {num_top}")
    num_positions, vocab_size = logits.shape
    chunk = max(1, _MAX_ELEMENTS_PER_CHUNK // max(vocab_size, 1))
    # A plain copy: the entries are read back on the host right below, so an asynchronous
    # upload would gain nothing.
    targets = torch.tensor(next_token_ids, dtype=torch.int64, device=logits.device)
    results: list[SampleLogprobs] = []
    for start in range(0, num_positions, chunk):
        end = min(start + chunk, num_positions)
        results.extend(
            gather_logprobs(logits[start:end], targets[start:end], [num_top] * (end - start))
        )
    return results
