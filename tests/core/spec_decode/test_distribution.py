"""The sampled output distribution with speculation is the target model's.

A tiny vocabulary (8 tokens) lets us compute the exact probability of every 4-token
continuation under the target (transformers, float32) at temperature 1 with top-k 3 and
top-p 0.9: at most 3^4 = 81 continuations. kvplane samples 4,000 of them, one seed per
request, with drafts from the n-gram lookup or from another random model (so drafts are
accepted, rejected and followed by bonus tokens), and a chi-square goodness-of-fit test
must not reject at significance level 0.001 (cells with expected count below 5 pooled).
Seeded, so the test is deterministic; the level bounds how unlucky a seed set could be.
"""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from kvplane import LLM, SamplingParams
from kvplane.testing.models import save_random_model, tiny_llama_config

VOCAB = 8
PROMPT = [0, 1, 2, 3, 4, 5, 6, 7, 3, 1, 6, 2]  # every token: the n-gram lookup always drafts
NUM_TOKENS = 4
NUM_SAMPLES = 4000
TOP_K = 3
TOP_P = 0.9
SIGNIFICANCE = 0.001


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Any]:
    target_dir = tmp_path_factory.mktemp("dist-target")
    draft_dir = tmp_path_factory.mktemp("dist-draft")
    # A wide init for peaked, varied distributions over the 8 tokens.
    target = save_random_model(
        tiny_llama_config(vocab_size=VOCAB, initializer_range=0.5), target_dir, seed=0
    )
    # The draft: the target with noisy weights, so that it agrees now and then.
    draft = save_random_model(target.config, draft_dir, seed=1)
    with torch.no_grad():
        for mine, theirs in zip(draft.parameters(), target.parameters(), strict=True):
            mine.copy_(theirs + 0.3 * torch.randn_like(theirs) * theirs.std())
    draft.save_pretrained(str(draft_dir))
    return target_dir, draft_dir, target


def processed_probs(logits: torch.Tensor) -> torch.Tensor:  # [vocab] -> [vocab]
    """Temperature 1, then top-k (ties kept) and top-p (smallest prefix reaching p) as
    kvplane defines them, renormalised."""
    probs = torch.softmax(logits.double(), dim=-1)
    ordered, _ = probs.sort(descending=True)
    kept = probs >= ordered[TOP_K - 1]
    mass_before = ordered.cumsum(0) - ordered
    num_top_p = int((mass_before < TOP_P).sum().clamp(min=1))
    kept &= probs >= ordered[num_top_p - 1]
    probs = torch.where(kept, probs, torch.zeros_like(probs))
    return probs / probs.sum()


def exact_distribution(model: Any) -> dict[tuple[int, ...], float]:
    """P(continuation) for every continuation of NUM_TOKENS tokens with nonzero mass."""
    table: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(NUM_TOKENS):
        grown: dict[tuple[int, ...], float] = {}
        for prefix, mass in table.items():
            with torch.inference_mode():
                logits = model(torch.tensor([PROMPT + list(prefix)])).logits[0, -1]
            for token, p in enumerate(processed_probs(logits).tolist()):
                if p > 0.0:
                    grown[(*prefix, token)] = mass * p
        table = grown
    return table


def chi_square_p_value(observed: Counter[tuple[int, ...]], expected: dict[Any, float]) -> float:
    cells: list[tuple[float, float]] = []  # (observed, expected count)
    pooled_obs = pooled_exp = 0.0
    for key, p in expected.items():
        count = NUM_SAMPLES * p
        if count < 5:
            pooled_obs += observed.get(key, 0)
            pooled_exp += count
        else:
            cells.append((observed.get(key, 0), count))
    if pooled_exp > 0:
        cells.append((pooled_obs, pooled_exp))
    statistic = sum((o - e) ** 2 / e for o, e in cells)
    dof = len(cells) - 1
    # Chi-square survival function: the upper regularized incomplete gamma Q(dof/2, x/2).
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0), torch.tensor(statistic / 2.0)))


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_sampled_distribution_is_the_targets(method: str, models: tuple[Path, Path, Any]) -> None:
    target_dir, draft_dir, target = models
    config: dict[str, Any] = {"method": method, "num_speculative_tokens": 2,
                              "disable_by_batch_size": 0}  # fmt: skip
    if method == "ngram":
        config.update(prompt_lookup_min=1, prompt_lookup_max=2)
    else:
        config["model"] = str(draft_dir)
    llm = LLM(model=str(target_dir), device="cpu", dtype="float32", skip_tokenizer_init=True,
              kv_cache_memory_bytes=32 * 2**20, max_model_len=64,
              speculative_config=config)  # fmt: skip
    params = [
        SamplingParams(temperature=1.0, top_k=TOP_K, top_p=TOP_P, seed=seed,
                       max_tokens=NUM_TOKENS, ignore_eos=True, detokenize=False)
        for seed in range(NUM_SAMPLES)
    ]  # fmt: skip
    outputs = llm.generate([{"prompt_token_ids": PROMPT}] * NUM_SAMPLES, params)
    observed = Counter(tuple(o.outputs[0].token_ids) for o in outputs)
    stats = llm.engine.stats().spec_decode
    assert stats is not None
    # Drafts were both accepted and rejected, enough to matter.
    assert stats.num_draft_tokens > NUM_SAMPLES
    assert 0.1 < stats.acceptance_rate < 0.9
    expected = exact_distribution(target)
    assert set(observed) <= set(expected)  # nothing top-k / top-p excludes
    assert abs(sum(expected.values()) - 1.0) < 1e-9
    assert chi_square_p_value(observed, expected) > SIGNIFICANCE


def test_the_test_rejects_a_wrong_distribution(models: tuple[Path, Path, Any]) -> None:
    """The same test catches a sampler that ignored top-p (a plain top-k distribution)."""
    *_, target = models
    expected = exact_distribution(target)
    keys = list(expected)
    rng = torch.Generator().manual_seed(0)
    # Draw from a distorted distribution: the first continuation twice as likely.
    weights = torch.tensor([expected[k] * (2.0 if i == 0 else 1.0) for i, k in enumerate(keys)])
    draws = torch.multinomial(weights, NUM_SAMPLES, replacement=True, generator=rng)
    observed = Counter(keys[i] for i in draws.tolist())
    assert chi_square_p_value(observed, expected) < SIGNIFICANCE
    assert list(itertools.islice(expected, 1))  # non-empty
