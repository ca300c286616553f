"""SamplingParams: vLLM's defaults, normalisation and validation messages."""

from __future__ import annotations

from typing import Any

import pytest

from kvplane.sampling import SamplingParams, SamplingType


def test_defaults_mirror_vllm() -> None:
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert (p.max_tokens, p.min_tokens, p.seed, p.logprobs, p.prompt_logprobs) == (
        16,
        0,
        None,
        None,
        None,
    )
    assert p.stop == [] and p.stop_token_ids == []
    assert not p.ignore_eos and not p.include_stop_str_in_output
    assert p.skip_special_tokens and p.spaces_between_special_tokens and p.detokenize
    assert p.logit_bias is None and p.allowed_token_ids is None
    assert not p.has_penalties


def test_normalisation() -> None:
    p = SamplingParams(stop="###", top_k=-1, logit_bias={"50": -100, 7: 2})  # type: ignore[dict-item]
    assert p.stop == ["###"]
    assert p.top_k == 0
    assert p.logit_bias == {50: -100.0, 7: 2.0}
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]  # type: ignore[arg-type]
    assert SamplingParams(stop_token_ids=None).stop_token_ids == []
    assert SamplingParams(max_tokens=None).max_tokens is None


@pytest.mark.parametrize(
    ("kwargs", "sampling_type"),
    [
        ({}, SamplingType.RANDOM),
        ({"temperature": 0.0}, SamplingType.GREEDY),
        ({"temperature": 9e-6, "seed": 1}, SamplingType.GREEDY),
        ({"temperature": 1e-5}, SamplingType.RANDOM),
        ({"seed": 0}, SamplingType.RANDOM_SEED),
    ],
)
def test_sampling_type(kwargs: dict[str, Any], sampling_type: SamplingType) -> None:
    assert SamplingParams(**kwargs).sampling_type == sampling_type


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 0}, "n must be at least 1, got 0"),
        ({"presence_penalty": 2.5}, r"presence_penalty must be in \[-2, 2\], got 2.5"),
        ({"frequency_penalty": -2.1}, r"frequency_penalty must be in \[-2, 2\]"),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be greater than zero"),
        ({"temperature": -0.1}, "temperature must be non-negative"),
        ({"temperature": float("inf")}, "temperature must be non-negative and finite"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"top_k": -2}, "top_k must be 0 or -1"),
        ({"min_p": 1.2}, r"min_p must be in \[0, 1\]"),
        ({"max_tokens": 0}, "max_tokens must be at least 1, got 0"),
        ({"min_tokens": -1}, "min_tokens must be at least 0"),
        (
            {"min_tokens": 5, "max_tokens": 4},
            "min_tokens must be less than or equal to max_tokens=4",
        ),
        ({"logprobs": -1}, "logprobs must be non-negative"),
        ({"prompt_logprobs": -3}, "prompt_logprobs must be non-negative"),
        ({"seed": 2**64}, "seed must be in"),
        ({"stop": ["ok", ""]}, "stop must contain only non-empty strings"),
        ({"stop": "x", "detokenize": False}, "only supported when detokenize is True"),
        ({"stop_token_ids": [1, -2]}, "stop_token_ids must be non-negative ints"),
        ({"logit_bias": {"abc": 1.0}}, "logit_bias must map token ids to numbers"),
        ({"logit_bias": {-1: 1.0}}, "logit_bias keys must be non-negative"),
        ({"logit_bias": {1: float("nan")}}, "logit_bias values must be finite"),
        ({"allowed_token_ids": []}, "allowed_token_ids must not be empty"),
        ({"allowed_token_ids": [1, "2"]}, "allowed_token_ids must be non-negative ints"),
    ],
)
def test_validation_errors(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_accepts_boundaries() -> None:
    SamplingParams(
        presence_penalty=-2.0,
        frequency_penalty=2.0,
        top_p=1.0,
        min_p=1.0,
        min_tokens=16,
        max_tokens=16,
        logprobs=0,
        seed=-(2**63),
    )
    SamplingParams(min_tokens=1000, max_tokens=None)


def test_check_token_ids_against_the_vocabulary() -> None:
    SamplingParams(stop_token_ids=[9], allowed_token_ids=[0, 9], logit_bias={9: 1}).check_token_ids(
        10
    )
    for bad in (
        {"stop_token_ids": [10]},
        {"allowed_token_ids": [3, 12]},
        {"logit_bias": {10: 1.0}},
    ):
        with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 10\)"):
            SamplingParams(**bad).check_token_ids(10)  # type: ignore[arg-type]


def test_clone_is_deep() -> None:
    original = SamplingParams(stop=["a"], logit_bias={1: 1.0}, allowed_token_ids=[1, 2])
    copy = original.clone()
    assert copy == original
    assert copy.stop is not None and copy.logit_bias is not None
    copy.stop.append("b")
    copy.logit_bias[2] = 3.0
    assert original.stop == ["a"] and original.logit_bias == {1: 1.0}
