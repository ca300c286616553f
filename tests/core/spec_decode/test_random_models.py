"""Speculative decoding on small random-weight models built from real transformers
configs: greedy output token-identical to no speculation for every method, a model
drafting for itself accepts everything, preemption, prefix caching, chunked budgets,
stops inside accepted drafts, seeds, and the turn-down by batch size."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from transformers import Qwen3Config

from kvplane import LLM, SamplingParams
from kvplane.testing.models import save_random_model, tiny_llama_config
from tests.core.engine.conftest import assert_no_block_leak

VOCAB = 256
# Short prompts that repeat themselves, so the n-gram proposer finds matches; random
# weights loop soon too.
PROMPTS = [
    [5, 9, 17, 33, 5, 9, 17, 33, 5, 9],
    [100, 101, 102, 103, 104, 105, 106, 107, 100, 101, 102],
    [7, 7, 7, 7],
    [250, 3, 251, 4, 252, 5, 250, 3],
    list(range(40, 80)) + list(range(40, 50)),
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, detokenize=False)
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
         "prompt_lookup_max": 3, "disable_by_batch_size": 0}  # fmt: skip


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("spec-llama")
    # A wider init than transformers' default makes greedy choices far from ties.
    save_random_model(tiny_llama_config(vocab_size=VOCAB, initializer_range=0.2), directory)
    return directory


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A different architecture with the same vocabulary: a draft for ``llama_dir``."""
    directory = tmp_path_factory.mktemp("spec-qwen3")
    config = Qwen3Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        max_position_embeddings=512, tie_word_embeddings=True, initializer_range=0.2,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )  # fmt: skip
    save_random_model(config, directory, seed=1)
    return directory


def make_tiny_llm(model: Path, **options: Any) -> LLM:
    options.setdefault("kv_cache_memory_bytes", 8 * 2**20)
    options.setdefault("max_model_len", 512)
    return LLM(model=str(model), device="cpu", dtype="float32", skip_tokenizer_init=True, **options)


def token_ids(llm: LLM, prompts: list[list[int]], params: SamplingParams = GREEDY) -> list[Any]:
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    return [list(o.outputs[0].token_ids) for o in outputs]


@pytest.fixture(scope="module")
def baseline(llama_dir: Path) -> list[Any]:
    return token_ids(make_tiny_llm(llama_dir), PROMPTS)


def draft(model: Path, num_tokens: int = 3) -> dict[str, Any]:
    return {"method": "draft_model", "model": str(model), "num_speculative_tokens": num_tokens,
            "disable_by_batch_size": 0}  # fmt: skip


@pytest.mark.parametrize("method", ["ngram", "draft_model", "self"])
def test_greedy_is_identical_for_every_method(
    method: str, llama_dir: Path, qwen3_dir: Path, baseline: list[Any]
) -> None:
    config = {"ngram": NGRAM, "draft_model": draft(qwen3_dir), "self": draft(llama_dir)}[method]
    llm = make_tiny_llm(llama_dir, speculative_config=config)
    assert token_ids(llm, PROMPTS) == baseline
    stats = llm.engine.stats().spec_decode
    assert stats is not None and stats.num_draft_tokens > 0
    if method == "self":  # drafting for itself, a model accepts everything
        assert stats.acceptance_rate == 1.0
        assert stats.mean_accepted_length > 3.5  # 4, less where max_tokens allows fewer
    elif method == "ngram":  # random weights loop, and the loops get drafted
        assert 0.0 < stats.acceptance_rate < 1.0
    assert_no_block_leak(llm)
    proposer = llm.engine.spec_decoder.proposer  # type: ignore[union-attr]
    if method != "ngram":  # the draft's own cache is freed with its requests
        proposer.block_manager.check_invariants()
        assert proposer.block_manager.num_free_blocks == proposer.block_manager.num_blocks


def test_preemption_with_drafts(llama_dir: Path, baseline: list[Any]) -> None:
    probe = make_tiny_llm(llama_dir)
    block_bytes = probe.engine.runner.bytes_per_block()
    llm = make_tiny_llm(
        llama_dir,
        speculative_config=NGRAM,
        kv_cache_memory_bytes=8 * block_bytes,
        max_model_len=96,
    )
    assert token_ids(llm, PROMPTS) == baseline
    stats = llm.engine.stats()
    assert stats.num_preemptions_total > 0
    assert stats.spec_decode is not None and stats.spec_decode.num_accepted_tokens > 0
    assert_no_block_leak(llm)


def test_prefix_caching_with_drafts(llama_dir: Path) -> None:
    shared = list(range(1, 50))
    prompts = [[*shared, 200 + i, 201 + i] for i in range(3)]
    expected = token_ids(make_tiny_llm(llama_dir), prompts)
    llm = make_tiny_llm(llama_dir, speculative_config=NGRAM)
    assert token_ids(llm, prompts[:1]) == expected[:1]
    # The rest hit the blocks the first left in the cache, outputs included.
    assert token_ids(llm, prompts) == expected
    assert llm.engine.stats().prefix_cache_hits > 0
    assert_no_block_leak(llm)


def test_small_token_budget_truncates_drafts(llama_dir: Path, baseline: list[Any]) -> None:
    llm = make_tiny_llm(llama_dir, speculative_config=NGRAM, max_num_batched_tokens=6)
    assert token_ids(llm, PROMPTS) == baseline
    assert_no_block_leak(llm)


def test_stops_inside_accepted_drafts(llama_dir: Path, baseline: list[Any]) -> None:
    """A stop token or max_tokens reached among a step's accepted tokens ends the output
    exactly where it ends without speculation."""
    llm = make_tiny_llm(llama_dir, speculative_config=draft(llama_dir, 4))
    plain = make_tiny_llm(llama_dir)
    for max_tokens in (5, 7, 13):
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, detokenize=False)
        assert token_ids(llm, PROMPTS, params) == [b[:max_tokens] for b in baseline]
    stop_ids = [b[6] for b in baseline]  # stops each prompt's output early
    params = SamplingParams(temperature=0.0, max_tokens=40, stop_token_ids=stop_ids,
                            detokenize=False)  # fmt: skip
    assert token_ids(llm, PROMPTS, params) == token_ids(plain, PROMPTS, params)
    assert_no_block_leak(llm)


def test_seeded_sampling_is_the_same_with_or_without_drafts(llama_dir: Path) -> None:
    """The seeded generator is rewound to one draw per emitted token, so a seed gives the
    same tokens with drafts, without them, and in any batch."""
    params = [
        SamplingParams(temperature=t, top_p=0.9, top_k=20, seed=s, max_tokens=30,
                       detokenize=False, ignore_eos=True)
        for s, t in zip(range(len(PROMPTS)), (1.0, 0.7, 1.3, 1.0, 0.5), strict=True)
    ]  # fmt: skip
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    expected = [o.outputs[0].token_ids for o in make_tiny_llm(llama_dir).generate(prompts, params)]
    llm = make_tiny_llm(llama_dir, speculative_config=draft(llama_dir, 3))
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert got == expected
    alone = [
        llm.generate([p], q)[0].outputs[0].token_ids for p, q in zip(prompts, params, strict=True)
    ]
    assert alone == expected
    stats = llm.engine.stats().spec_decode
    assert stats is not None and 0 < stats.num_accepted_tokens < stats.num_draft_tokens


def test_logprobs_match_without_drafts(llama_dir: Path) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=20, logprobs=2, detokenize=False,
                            ignore_eos=True)  # fmt: skip
    prompts = [{"prompt_token_ids": p} for p in PROMPTS[:2]]
    expected = make_tiny_llm(llama_dir).generate(prompts, params)
    got = make_tiny_llm(llama_dir, speculative_config=draft(llama_dir)).generate(prompts, params)
    for a, b in zip(expected, got, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        # A position scored in a step of several query tokens: float32 rounding only.
        close = {"rel": 1e-4, "abs": 1e-4}
        assert a.outputs[0].cumulative_logprob == pytest.approx(
            b.outputs[0].cumulative_logprob, **close
        )
        for entry_a, entry_b in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, strict=True):
            assert entry_a.keys() == entry_b.keys()
            for token_id in entry_a:
                assert entry_a[token_id].logprob == pytest.approx(
                    entry_b[token_id].logprob, **close
                )


def test_speculation_turns_off_in_large_batches(llama_dir: Path, baseline: list[Any]) -> None:
    config = {**NGRAM, "disable_by_batch_size": 3}
    llm = make_tiny_llm(llama_dir, speculative_config=config)
    decoder = llm.engine.spec_decoder
    assert decoder is not None
    assert token_ids(llm, PROMPTS[:2]) == baseline[:2]  # 2 running: on
    drafted = decoder.stats().num_draft_tokens
    assert drafted > 0 and decoder.is_enabled
    # 5 equal-length requests run together to the end: never fewer than 3, always off.
    same = [PROMPTS[0]] * 5
    assert token_ids(llm, same) == [baseline[0]] * 5
    assert decoder.stats().num_draft_tokens == drafted and not decoder.is_enabled
    assert token_ids(llm, PROMPTS[:1]) == baseline[:1]  # back on when small
    assert decoder.stats().num_draft_tokens > drafted and decoder.is_enabled


def test_requests_that_read_their_tokens_get_no_drafts(llama_dir: Path) -> None:
    """Penalties and min_tokens make each position's processing depend on the tokens
    before it: such sequences decode without drafts (and are still exact)."""
    llm = make_tiny_llm(llama_dir, speculative_config=NGRAM)
    params = SamplingParams(temperature=0.0, max_tokens=20, repetition_penalty=1.3,
                            detokenize=False)  # fmt: skip
    expected = token_ids(make_tiny_llm(llama_dir), PROMPTS, params)
    assert token_ids(llm, PROMPTS, params) == expected
    stats = llm.engine.stats().spec_decode
    assert stats is not None and stats.num_drafts == 0
