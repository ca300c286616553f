"""Sample and prompt logprobs: vLLM's shape, raw-distribution values, ranks."""

from __future__ import annotations

import pytest
import torch

from kvplane.ops import Ops
from kvplane.sampling import (
    Logprob,
    Sampler,
    SamplingParams,
    SequenceSamplingState,
    compute_prompt_logprobs,
)
from kvplane.sampling import logprobs as logprobs_module

VOCAB_SIZE = 40


def check_entry(
    entry: dict[int, Logprob], raw_row: torch.Tensor, chosen: int, num_top: int
) -> None:
    """``entry`` holds the chosen token and the num_top best, valued by log_softmax(raw)."""
    reference = torch.log_softmax(raw_row.float(), dim=-1)  # [vocab]
    top = reference.topk(num_top).indices.tolist() if num_top else []
    assert next(iter(entry)) == chosen  # the chosen token comes first
    assert set(entry) == {chosen, *top}
    for token, logprob in entry.items():
        assert logprob.logprob == pytest.approx(reference[token].item(), abs=1e-5)
        assert logprob.rank == 1 + int((reference > reference[token]).sum())
        assert logprob.decoded_token is None
    assert [entry[token].rank for token in top] == list(range(1, num_top + 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sample_logprobs_come_from_the_raw_distribution(ops: Ops, dtype: torch.dtype) -> None:
    sampler = Sampler(ops, VOCAB_SIZE)
    raw = (torch.randn(5, VOCAB_SIZE, generator=torch.Generator().manual_seed(0)) * 2).to(dtype)
    # Processing that changes the distribution must not change the reported logprobs.
    heavy = {
        "temperature": 0.3,
        "repetition_penalty": 1.8,
        "frequency_penalty": 1.0,
        "logit_bias": {7: 30.0},
    }
    params = [
        SamplingParams(logprobs=0, **heavy),
        SamplingParams(logprobs=3, **heavy),
        SamplingParams(logprobs=VOCAB_SIZE + 5, temperature=0.0),  # more than the vocab
        SamplingParams(),  # no logprobs in the same batch
        SamplingParams(logprobs=5, temperature=0.0),
    ]
    states = [SequenceSamplingState(p, [1, 2], [3, 3]) for p in params]
    out = sampler(raw, states, torch.Generator().manual_seed(1))

    assert out.logprobs[3] is None
    assert out.sampled_token_ids[0] == 7 and out.sampled_token_ids[1] == 7  # biased
    for row in (0, 1, 2, 4):
        entry = out.logprobs[row]
        assert entry is not None
        num_top = min(params[row].logprobs or 0, VOCAB_SIZE)
        check_entry(entry, raw[row], out.sampled_token_ids[row], num_top)
    assert len(out.logprobs[0] or {}) == 1
    assert len(out.logprobs[2] or {}) == VOCAB_SIZE
    # A greedy row's token is the raw argmax here: rank 1, reported once.
    assert (out.logprobs[4] or {})[out.sampled_token_ids[4]].rank == 1
    assert len(out.logprobs[4] or {}) == 5


def test_prompt_logprobs_match_log_softmax(monkeypatch: pytest.MonkeyPatch) -> None:
    logits = torch.randn(9, VOCAB_SIZE, generator=torch.Generator().manual_seed(2))
    next_ids = [int(t) for t in torch.randint(0, VOCAB_SIZE, (9,))]
    whole = compute_prompt_logprobs(logits, next_ids, num_top=4)
    assert len(whole) == 9
    for row, entry in enumerate(whole):
        check_entry(entry, logits[row], next_ids[row], 4)
    # Chunked over positions (a long prompt) gives the same answer.
    monkeypatch.setattr(logprobs_module, "_MAX_ELEMENTS_PER_CHUNK", 2 * VOCAB_SIZE)
    assert compute_prompt_logprobs(logits, next_ids, num_top=4) == whole
    only_next = compute_prompt_logprobs(logits, next_ids, num_top=0)
    assert [list(entry) for entry in only_next] == [[t] for t in next_ids]


def test_prompt_logprobs_reject_mismatched_inputs() -> None:
    with pytest.raises(ValueError, match="3 logits rows but 2"):
        compute_prompt_logprobs(torch.zeros(3, VOCAB_SIZE), [1, 2], 1)
    with pytest.raises(ValueError, match="num_top"):
        compute_prompt_logprobs(torch.zeros(2, VOCAB_SIZE), [1, 2], -1)
