"""Shared fixtures for the sampling tests: a reference-ops sampler and state factories."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from kvplane.ops import Ops, reference_ops
from kvplane.sampling import Sampler, SamplingParams, SequenceSamplingState

VOCAB_SIZE = 32


@pytest.fixture
def ops() -> Ops:
    return Ops(**reference_ops())


@pytest.fixture
def sampler(ops: Ops) -> Sampler:
    return Sampler(ops, VOCAB_SIZE)


@pytest.fixture
def make_state() -> Callable[..., SequenceSamplingState]:
    """``make_state(prompt=[...], output=[...], eos=(...), **sampling_params)``."""

    def factory(
        prompt: list[int] | None = None,
        output: list[int] | None = None,
        eos: tuple[int, ...] = (),
        **params: Any,
    ) -> SequenceSamplingState:
        return SequenceSamplingState(
            params=SamplingParams(**params),
            prompt_token_ids=list(prompt or [1, 2, 3]),
            output_token_ids=list(output or []),
            eos_token_ids=frozenset(eos),
        )

    return factory


@pytest.fixture
def logits() -> torch.Tensor:  # [8, VOCAB_SIZE]
    return torch.randn(8, VOCAB_SIZE, generator=torch.Generator().manual_seed(0)) * 3
