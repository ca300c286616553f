"""The CUDA platform's sampling kernel (top-k / top-p / min-p, then the exponential race)
against the reference, token for token, on fresh random and adversarial inputs.

On the CPU the kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``); on a GPU,
without the interpreter, every case also runs compiled, plus a full Qwen3 vocabulary.
"""

from __future__ import annotations

import pytest
import torch

from kvplane.ops import reference as ref
from tests.platforms.cuda.op_cases import DEVICES, OPS, realistic

SAMPLING_VARIANTS = ["top_k", "top_p", "min_p", "top_k_top_p", "all"]
TINY = torch.finfo(torch.float32).tiny
Limits = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]


def _limits(variant: str, num_seqs: int, vocab_size: int, gen: torch.Generator) -> Limits:
    def pick(choices: list[float]) -> torch.Tensor:
        return torch.tensor(choices)[torch.randint(0, len(choices), (num_seqs,), generator=gen)]

    top_k = pick([0, -1, 1, 2, 5, 50, vocab_size - 1, vocab_size, vocab_size + 7]).long()
    top_p = pick([1.0, 0.99, 0.95, 0.8, 0.5, 0.1, 0.0]).float()
    min_p = pick([0.0, 0.02, 0.1, 0.5]).float()
    return (
        top_k if variant in ("top_k", "top_k_top_p", "all") else None,
        top_p if variant in ("top_p", "top_k_top_p", "all") else None,
        min_p if variant in ("min_p", "all") else None,
    )


def _revealing_noise(probs: torch.Tensor) -> torch.Tensor:
    """Noise under which the smallest kept probability wins the race (its first index on
    ties): the sampled token then pins down the combined threshold exactly."""
    return (probs * (1.0 + probs)).clamp(min=TINY)


def _noise(kind: str, probs: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    if kind == "revealing":
        return _revealing_noise(probs)
    return torch.empty(probs.shape).exponential_(generator=gen).clamp_(min=TINY)


def _sample(device: str, probs: torch.Tensor, limits: Limits, noise: torch.Tensor) -> list[int]:
    on_device = [None if t is None else t.to(device) for t in (probs, *limits, noise)]
    tokens = OPS["top_k_top_p_sample"](*on_device)
    assert tokens.dtype == torch.int64 and tokens.shape == (probs.shape[0],)
    return tokens.cpu().tolist()


def _assert_matches_reference(
    device: str, probs: torch.Tensor, limits: Limits, noise: torch.Tensor
) -> None:
    expected = ref.top_k_top_p_sample(probs, *limits, noise).tolist()
    actual = _sample(device, probs, limits, noise)
    mismatched = [row for row, (a, e) in enumerate(zip(actual, expected, strict=True)) if a != e]
    assert not mismatched, f"rows {mismatched}: got {actual}, reference {expected}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", SAMPLING_VARIANTS)
@pytest.mark.parametrize(
    ("num_seqs", "vocab_size", "noise_kind"),
    [(16, 1000, "random"), (16, 1000, "revealing"), (2, 32000, "random"), (2, 32000, "revealing")],
)
def test_top_k_top_p_sample_matches_reference_exactly(
    device: str,
    variant: str,
    num_seqs: int,
    vocab_size: int,
    noise_kind: str,
    generator: torch.Generator,
) -> None:
    probs = (torch.randn(num_seqs, vocab_size, generator=generator) * 3.0).softmax(dim=-1)
    limits = _limits(variant, num_seqs, vocab_size, generator)
    _assert_matches_reference(device, probs, limits, _noise(noise_kind, probs, generator))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", SAMPLING_VARIANTS)
def test_top_k_top_p_sample_with_many_tied_probabilities(
    device: str, variant: str, generator: torch.Generator
) -> None:
    # Few distinct logits (as low-precision logits give): the k-th probability and the
    # top-p boundary fall inside runs of equal probabilities.
    num_seqs, vocab_size = 16, 600
    logits = torch.randint(-6, 7, (num_seqs, vocab_size), generator=generator) / 2.0
    probs = logits.softmax(dim=-1)
    limits = _limits(variant, num_seqs, vocab_size, generator)
    for kind in ("random", "revealing"):
        _assert_matches_reference(device, probs, limits, _noise(kind, probs, generator))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("top_k", "top_p", "expected"),
    [
        (2, None, 1),  # 0.25 is 2nd: kept
        (3, None, 2),  # the 3rd, 0.125, ties with the 4th: both kept, first index wins
        (None, 0.5, 0),  # mass before 0.25 is 0.5, not < 0.5
        (None, 0.75, 1),  # mass before the first 0.125 is exactly 0.75: dropped
        (None, 0.8, 2),  # ... and 0.8 keeps it, and its tie
        (None, 0.875, 2),  # mass before the second 0.125 is 0.875; the tie keeps it anyway
        (None, 0.0, 0),  # the top token is always kept
        (2, 0.9, 1),
    ],
)
def test_top_k_top_p_sample_exact_boundaries(
    device: str, top_k: int | None, top_p: float | None, expected: int
) -> None:
    probs = torch.tensor([[0.5, 0.25, 0.125, 0.125]])  # exact in float32: no rounding
    limits: Limits = (
        None if top_k is None else torch.tensor([top_k]),
        None if top_p is None else torch.tensor([top_p]),
        None,
    )
    noise = _revealing_noise(probs)
    assert ref.top_k_top_p_sample(probs, *limits, noise).tolist() == [expected]
    assert _sample(device, probs, limits, noise) == [expected]


@pytest.mark.parametrize("device", DEVICES)
def test_top_p_one_drops_the_tail_exactly_as_the_reference(
    device: str, generator: torch.Generator
) -> None:
    # The reference's float32 mass before a tail token can round up to 1.0, and then
    # top_p=1.0 drops that token: the kernel must drop the same ones.
    num_seqs, vocab_size = 16, 1000
    probs = (torch.randn(num_seqs, vocab_size, generator=generator) * 4.0).softmax(dim=-1)
    limits: Limits = (None, torch.ones(num_seqs), None)
    noise = _revealing_noise(probs)
    without_top_p = ref.top_k_top_p_sample(probs, None, None, torch.zeros(num_seqs), noise)
    with_top_p = ref.top_k_top_p_sample(probs, *limits, noise)
    assert (without_top_p != with_top_p).any(), "no row exercises the rounding"
    _assert_matches_reference(device, probs, limits, noise)


@pytest.mark.parametrize("device", DEVICES)
def test_top_k_top_p_sample_without_limits_is_the_plain_race(
    device: str, generator: torch.Generator
) -> None:
    probs = torch.randn(3, 500, generator=generator).softmax(dim=-1)
    noise = torch.empty(3, 500).exponential_(generator=generator)
    _assert_matches_reference(device, probs, (None, None, None), noise)


@realistic
@pytest.mark.parametrize("variant", SAMPLING_VARIANTS)
@pytest.mark.parametrize("noise_kind", ["random", "revealing"])
def test_top_k_top_p_sample_at_vocab_151936(
    variant: str, noise_kind: str, generator: torch.Generator
) -> None:
    num_seqs, vocab_size = 64, 151936
    probs = (torch.randn(num_seqs, vocab_size, generator=generator) * 3.0).softmax(dim=-1)
    limits = _limits(variant, num_seqs, vocab_size, generator)
    _assert_matches_reference("cuda", probs, limits, _noise(noise_kind, probs, generator))
