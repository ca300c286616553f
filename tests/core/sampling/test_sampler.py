"""Sampler features against plain references computed here: greedy, bias, masks, penalties."""

from __future__ import annotations

import gc
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
import torch

from kvplane.engine.transfer import DeviceTransfer
from kvplane.ops import Ops
from kvplane.sampling import Sampler, SequenceSamplingState
from kvplane.sampling.penalties import PenaltyCache

VOCAB_SIZE = 32  # the conftest sampler's vocabulary

MakeState = Callable[..., SequenceSamplingState]


class CapturingSample:
    """Wraps the reference ``top_k_top_p_sample`` and records what the sampler passed."""

    def __init__(self, inner: Callable[..., torch.Tensor]) -> None:
        self.inner = inner
        self.calls: list[dict[str, Any]] = []

    def __call__(self, probs, top_k, top_p, min_p, exponential_noise):  # type: ignore[no-untyped-def]
        self.calls.append({"probs": probs.clone(), "top_k": top_k, "top_p": top_p, "min_p": min_p})
        return self.inner(probs, top_k, top_p, min_p, exponential_noise)


@pytest.fixture
def capture(ops: Ops) -> CapturingSample:
    return CapturingSample(ops.top_k_top_p_sample)


@pytest.fixture
def capturing_sampler(ops: Ops, capture: CapturingSample) -> Sampler:
    return Sampler(replace(ops, top_k_top_p_sample=capture), VOCAB_SIZE)


def reference_penalize(
    row: list[float],
    prompt: list[int],
    output: list[int],
    repetition: float,
    presence: float,
    frequency: float,
) -> list[float]:
    """HF repetition penalty over prompt + output, then OpenAI presence/frequency."""
    row = list(row)
    for token in set(prompt) | set(output):
        row[token] = row[token] / repetition if row[token] > 0 else row[token] * repetition
    for token, count in Counter(output).items():
        row[token] -= frequency * count + presence
    return row


# --------------------------------------------------------------------------------------
# Greedy, bias, allowed tokens, constraints
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_is_argmax(
    sampler: Sampler, make_state: MakeState, logits: torch.Tensor, dtype: torch.dtype
) -> None:
    logits = logits.to(dtype)
    states = [make_state(temperature=0.0) for _ in range(logits.shape[0])]
    out = sampler(logits, states)
    assert out.sampled_token_ids == logits.float().argmax(dim=-1).tolist()
    assert out.logprobs == [None] * logits.shape[0]


#: Sampling options of rows whose logits are processed (a working copy is made) and of
#: rows that only sample (the sampler reads the caller's tensor directly).
PROCESSED = dict(
    temperature=0.8, logit_bias={3: 5.0}, repetition_penalty=1.5, output=[4, 5],
    min_tokens=5, eos=(0,),
)  # fmt: skip
SAMPLED_ONLY = dict(temperature=0.8, top_k=5, output=[4, 5])
#: Each processing step alone: each must make the working copy before it writes.
ONE_STEP = {
    "bias": dict(logit_bias={3: 5.0}),
    "allowed": dict(allowed_token_ids=[1, 2]),
    "min-tokens": dict(min_tokens=5, eos=(0,)),
    "penalty": dict(presence_penalty=1.0, output=[4, 5]),
    "processor": dict(processor=lambda ids, row: row.mul_(0.0)),
}


@pytest.mark.parametrize(
    "options",
    [PROCESSED, SAMPLED_ONLY, *ONE_STEP.values()],
    ids=["processed", "sampled-only", *ONE_STEP],
)
def test_logits_are_not_modified(
    sampler: Sampler, make_state: MakeState, logits: torch.Tensor, options: dict[str, Any]
) -> None:
    before = logits.clone()
    params = {k: v for k, v in options.items() if k != "processor"}
    states = [make_state(**params) for _ in range(logits.shape[0])]
    if "processor" in options:
        for state in states:
            state.logits_processors.append(options["processor"])
    sampler(logits, states)
    assert torch.equal(logits, before)


def test_logit_bias_matches_reference(
    sampler: Sampler, make_state: MakeState, logits: torch.Tensor
) -> None:
    biases = [{int(logits[row].argmin()): 100.0} for row in range(4)] + [
        {0: -3.0, 5: 2.5, 7: 0.5} for _ in range(4)
    ]
    states = [make_state(temperature=0.0, logit_bias=b) for b in biases]
    expected = logits.clone()
    for row, bias in enumerate(biases):
        for token, value in bias.items():
            expected[row, token] += value
    out = sampler(logits, states)
    assert out.sampled_token_ids == expected.argmax(dim=-1).tolist()
    assert out.sampled_token_ids[:4] == [int(logits[row].argmin()) for row in range(4)]


def test_allowed_token_ids_greedy_and_random(
    sampler: Sampler, make_state: MakeState, logits: torch.Tensor
) -> None:
    allowed = [3, 9, 17]
    greedy = make_state(temperature=0.0, allowed_token_ids=allowed)
    randoms = [make_state(temperature=5.0, allowed_token_ids=allowed) for _ in range(7)]
    generator = torch.Generator().manual_seed(1)
    seen: set[int] = set()
    for _ in range(30):
        out = sampler(logits, [greedy, *randoms], generator)
        best_allowed = allowed[int(logits[0, allowed].argmax())]
        assert out.sampled_token_ids[0] == best_allowed
        seen.update(out.sampled_token_ids[1:])
    assert seen == set(allowed)  # a hot temperature reaches every allowed token, only them


def test_allowed_mask_fn_and_logits_processor(
    sampler: Sampler, make_state: MakeState, logits: torch.Tensor
) -> None:
    """The constraint seam: batched masks per row, then per-row processors."""
    masks_asked: list[list[int]] = []

    def only_even(output_ids: Any) -> torch.Tensor:
        masks_asked.append(list(output_ids))
        return torch.arange(VOCAB_SIZE) % 2 == 0

    def boost_last_token(output_ids: Any, row: torch.Tensor) -> torch.Tensor:
        row[VOCAB_SIZE - 1] += 1000.0
        return row

    constrained = make_state(temperature=0.0, output=[5, 6])
    constrained.allowed_mask_fn = only_even
    unconstrained_this_step = make_state(temperature=0.0)
    unconstrained_this_step.allowed_mask_fn = lambda output_ids: None
    processed = make_state(temperature=0.0)
    processed.logits_processors.append(boost_last_token)
    plain = make_state(temperature=0.0)
    out = sampler(logits[:4], [constrained, unconstrained_this_step, processed, plain])

    evens = list(range(0, VOCAB_SIZE, 2))
    assert out.sampled_token_ids[0] == evens[int(logits[0, evens].argmax())]
    assert out.sampled_token_ids[1] == int(logits[1].argmax())
    assert out.sampled_token_ids[2] == VOCAB_SIZE - 1
    assert out.sampled_token_ids[3] == int(logits[3].argmax())
    assert masks_asked == [[5, 6]]


# --------------------------------------------------------------------------------------
# min_tokens
# --------------------------------------------------------------------------------------


def test_min_tokens_blocks_eos_and_stop_tokens(sampler: Sampler, make_state: MakeState) -> None:
    eos, stop_token = 2, 7
    logits = torch.zeros(4, VOCAB_SIZE)
    logits[:, eos] = 50.0
    logits[:, stop_token] = 40.0
    logits[:, 11] = 30.0
    states = [
        make_state(temperature=0.0, eos=(eos,), stop_token_ids=[stop_token], min_tokens=2),
        make_state(
            temperature=0.0, eos=(eos,), stop_token_ids=[stop_token], min_tokens=2, output=[4]
        ),
        make_state(
            temperature=0.0, eos=(eos,), stop_token_ids=[stop_token], min_tokens=2, output=[4, 4]
        ),
        # ignore_eos: EOS cannot end the sequence, so only the stop token is blocked.
        make_state(
            temperature=0.0, eos=(eos,), stop_token_ids=[stop_token], min_tokens=2, ignore_eos=True
        ),
    ]
    assert sampler(logits, states).sampled_token_ids == [11, 11, eos, eos]


def test_min_tokens_random_rows_never_sample_eos(sampler: Sampler, make_state: MakeState) -> None:
    logits = torch.zeros(16, VOCAB_SIZE)
    logits[:, 0] = 3.0  # EOS is the most likely token by far
    states = [make_state(eos=(0,), min_tokens=3, temperature=1.0) for _ in range(16)]
    generator = torch.Generator().manual_seed(2)
    for _ in range(20):
        assert 0 not in sampler(logits, states, generator).sampled_token_ids
    free = [make_state(eos=(0,), temperature=1.0) for _ in range(16)]
    assert 0 in sampler(logits, free, generator).sampled_token_ids


# --------------------------------------------------------------------------------------
# Penalties
# --------------------------------------------------------------------------------------


def test_penalties_match_hand_computed(
    capturing_sampler: Sampler,
    capture: CapturingSample,
    make_state: MakeState,
    logits: torch.Tensor,
) -> None:
    """The probabilities handed to the op are softmax(reference_penalized / temperature)."""
    cases = [
        {"repetition_penalty": 1.7},
        {"repetition_penalty": 0.6},
        {"presence_penalty": 1.5},
        {"presence_penalty": -0.8},
        {"frequency_penalty": 0.9},
        {"frequency_penalty": -2.0},
        {"repetition_penalty": 1.3, "presence_penalty": 0.5, "frequency_penalty": 0.25},
        {},  # no penalty in the same batch
    ]
    prompts = [[1, 2, 3, 3, 30], [4, 5], [6], [0, 1], [7, 8, 9], [10], [11, 2, 12], [1, 2]]
    outputs = [
        [3, 3, 4],
        [5, 20, 20, 20],
        [6, 6, 7],
        [1, 1, 1, 2],
        [8, 9, 9],
        [10, 10],
        [2, 2, 13],
        [1],
    ]
    temperature = 0.7
    states = [
        make_state(prompt=p, output=o, temperature=temperature, **case)
        for p, o, case in zip(prompts, outputs, cases, strict=True)
    ]
    capturing_sampler(logits, states)
    probs = capture.calls[0]["probs"]
    for row, (p, o, case) in enumerate(zip(prompts, outputs, cases, strict=True)):
        expected_logits = reference_penalize(
            logits[row].tolist(),
            p,
            o,
            case.get("repetition_penalty", 1.0),
            case.get("presence_penalty", 0.0),
            case.get("frequency_penalty", 0.0),
        )
        expected = torch.softmax(torch.tensor(expected_logits) / temperature, dim=-1)
        torch.testing.assert_close(probs[row], expected, rtol=1e-5, atol=1e-7)


def test_penalty_counts_follow_appends_and_rollbacks(
    capturing_sampler: Sampler, capture: CapturingSample, make_state: MakeState
) -> None:
    """The incremental device counts equal a from-scratch count at every step."""
    logits = torch.randn(2, VOCAB_SIZE, generator=torch.Generator().manual_seed(3))
    states = [
        make_state(prompt=[1, 2], frequency_penalty=0.7, repetition_penalty=1.2),
        make_state(prompt=[3], presence_penalty=1.1),
    ]
    generator = torch.Generator().manual_seed(4)
    for step in range(12):
        if step == 8:  # the engine rolls back (e.g. rejected speculative tokens)
            del states[0].output_token_ids[2:]
        capture.calls.clear()
        out = capturing_sampler(logits, states, generator)
        probs = capture.calls[0]["probs"]
        for row, state in enumerate(states):
            p = state.params
            expected_logits = reference_penalize(
                logits[row].tolist(),
                state.prompt_token_ids,
                state.output_token_ids,
                p.repetition_penalty,
                p.presence_penalty,
                p.frequency_penalty,
            )
            torch.testing.assert_close(
                probs[row], torch.softmax(torch.tensor(expected_logits), dim=-1)
            )
        for state, token in zip(states, out.sampled_token_ids, strict=True):
            state.output_token_ids.extend([token, (token + step) % VOCAB_SIZE])


def test_penalty_slots_are_released_and_reused_clean(make_state: MakeState) -> None:
    cache = PenaltyCache(VOCAB_SIZE)
    host = DeviceTransfer(torch.device("cpu"), pin_memory=False)
    first = make_state(prompt=[1], output=[5, 5, 5], repetition_penalty=1.5)
    counts, prompt_mask = cache.gather([first], host)
    assert counts[0, 5] == 3 and prompt_mask[0, 1]
    assert cache.num_slots_in_use == 1
    del first
    gc.collect()
    assert cache.num_slots_in_use == 0
    second = make_state(prompt=[2], output=[6], repetition_penalty=1.5)
    counts, prompt_mask = cache.gather([second], host)
    assert counts[0].tolist() == [1 if t == 6 else 0 for t in range(VOCAB_SIZE)]
    assert prompt_mask[0].nonzero().flatten().tolist() == [2]
    many = [make_state(output=[i % VOCAB_SIZE], presence_penalty=1.0) for i in range(20)]
    counts, _ = cache.gather(many, host)  # grows past the first capacity
    assert counts.argmax(dim=-1).tolist() == [i % VOCAB_SIZE for i in range(20)]
    assert cache.num_slots_in_use == 21


# --------------------------------------------------------------------------------------
# Batch plumbing
# --------------------------------------------------------------------------------------


def test_mixed_batch_passes_none_for_unused_filters(
    capturing_sampler: Sampler,
    capture: CapturingSample,
    make_state: MakeState,
    logits: torch.Tensor,
) -> None:
    states = [make_state(temperature=0.0), make_state(temperature=1.0), make_state(top_p=0.9)]
    out = capturing_sampler(logits[:3], states)
    assert out.sampled_token_ids[0] == int(logits[0].argmax())
    (call,) = capture.calls
    assert call["probs"].shape == (2, VOCAB_SIZE)  # the greedy row never reaches the op
    assert call["top_k"] is None and call["min_p"] is None
    assert call["top_p"].tolist() == pytest.approx([1.0, 0.9])

    capture.calls.clear()
    capturing_sampler(logits[:2], [make_state(top_k=-1), make_state(top_k=5, min_p=0.1)])
    (call,) = capture.calls
    assert call["top_k"].tolist() == [0, 5] and call["top_p"] is None
    assert call["min_p"].tolist() == pytest.approx([0.0, 0.1])


def test_padded_vocab_columns_are_ignored(sampler: Sampler, make_state: MakeState) -> None:
    logits = torch.zeros(3, VOCAB_SIZE + 8)
    logits[:, VOCAB_SIZE:] = 1000.0  # padding the model emits but the tokenizer lacks
    logits[:, 4] = 1.0
    states = [make_state(temperature=0.0), make_state(temperature=1.0), make_state(logprobs=3)]
    out = sampler(logits, states, torch.Generator().manual_seed(0))
    assert out.sampled_token_ids[0] == 4
    assert all(token < VOCAB_SIZE for token in out.sampled_token_ids)
    logprobs = out.logprobs[2]
    assert logprobs is not None and all(token < VOCAB_SIZE for token in logprobs)


def test_rejects_bad_logits_shapes(sampler: Sampler, make_state: MakeState) -> None:
    with pytest.raises(ValueError, match="num_seqs=2"):
        sampler(torch.zeros(3, VOCAB_SIZE), [make_state(), make_state()])
    with pytest.raises(ValueError, match="fewer than vocab_size"):
        sampler(torch.zeros(1, VOCAB_SIZE - 1), [make_state()])
    assert sampler(torch.zeros(0, VOCAB_SIZE), []).sampled_token_ids == []
