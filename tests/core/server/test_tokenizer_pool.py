"""The tokenizer pool and the prompt-length bound, in process.

The bound must never refuse a prompt that fits (checked on the embedded SmolLM2 tokenizer
with texts built from its longest tokens) and must be withheld for tokenizer pipelines
that can drop or fuse characters; the pool's workers must give transformers' own ids and
texts, and tokenizing must leave the event loop free.
"""

from __future__ import annotations

import asyncio
import copy
import threading
import time
from typing import Any

import pytest
from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from kvplane.server.errors import APIError
from kvplane.server.prompt_limits import max_chars_per_token
from kvplane.server.tokenizer_pool import TokenizerPool, TokenizerWorker

SMOL_MAX_CHARS_PER_TOKEN = 81  # its longest token: 81 bytes of one character each
SENTENCE = "The quick brown fox jumps over the lazy dog. "


@pytest.fixture(scope="module")
def smol() -> Any:
    from kvplane.models.config import load_tokenizer
    from kvplane.models.source import resolve_model

    return load_tokenizer(resolve_model(None))


def bpe(**options: Any) -> Tokenizer:
    vocab = {"a": 0, "b": 1, "ab": 2, "abab": 3, "[UNK]": 4, " ": 5}
    merges = [("a", "b"), ("ab", "ab")]
    return Tokenizer(models.BPE(vocab, merges, **options))


def wrapped(tokenizer: Tokenizer) -> Any:
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


# -- the bound ---------------------------------------------------------------------------


def test_bound_of_the_embedded_tokenizer(smol: Any) -> None:
    assert max_chars_per_token(smol) == SMOL_MAX_CHARS_PER_TOKEN


def test_bound_never_refuses_a_text_that_fits(smol: Any) -> None:
    vocab = smol.get_vocab()
    longest = sorted(vocab, key=len, reverse=True)[:20]
    texts = [smol.convert_tokens_to_string([token]) * 50 for token in longest]
    texts += [" " * 5000, "\n" * 5000, "a" * 5000, "日本語🤖" * 500, SENTENCE * 100]
    for text in texts:
        num_tokens = len(smol.encode(text, add_special_tokens=False))
        assert len(text) <= num_tokens * SMOL_MAX_CHARS_PER_TOKEN, repr(text[:40])


def test_bound_of_a_plain_bpe_is_its_longest_token() -> None:
    assert max_chars_per_token(wrapped(bpe())) == len("[UNK]")


@pytest.mark.parametrize(
    "normalizer, factor",
    [
        (normalizers.NFC(), 4),
        (normalizers.Sequence([normalizers.Lowercase(), normalizers.NFKC()]), 4),
        (normalizers.Replace("  ", " "), 2),
        (normalizers.Sequence([normalizers.Prepend("_"), normalizers.Replace(" ", "_")]), 1),
    ],
)
def test_shrinking_normalizers_widen_the_bound(normalizer: Any, factor: int) -> None:
    tokenizer = bpe()
    tokenizer.normalizer = normalizer
    assert max_chars_per_token(wrapped(tokenizer)) == len("[UNK]") * factor


def with_normalizer(normalizer: Any) -> Tokenizer:
    tokenizer = bpe()
    tokenizer.normalizer = normalizer
    return tokenizer


def with_pre_tokenizer(pre_tokenizer: Any) -> Tokenizer:
    tokenizer = bpe()
    tokenizer.pre_tokenizer = pre_tokenizer
    return tokenizer


def with_added_token(token: AddedToken) -> Tokenizer:
    tokenizer = bpe()
    tokenizer.add_special_tokens([token])
    return tokenizer


@pytest.mark.parametrize(
    "tokenizer",
    [
        pytest.param(with_normalizer(normalizers.Strip()), id="strip"),
        pytest.param(with_normalizer(normalizers.BertNormalizer()), id="bert-normalizer"),
        pytest.param(with_normalizer(normalizers.Replace(Regex(" +"), " ")), id="regex"),
        pytest.param(with_normalizer(normalizers.Replace("x", "")), id="deletion"),
        pytest.param(with_pre_tokenizer(pre_tokenizers.Whitespace()), id="whitespace"),
        pytest.param(with_pre_tokenizer(pre_tokenizers.Split(" ", "removed")), id="removed"),
        pytest.param(
            with_pre_tokenizer(
                pre_tokenizers.Sequence([pre_tokenizers.Digits(), pre_tokenizers.WhitespaceSplit()])
            ),
            id="sequence",
        ),
        pytest.param(with_added_token(AddedToken("<mask>", lstrip=True)), id="lstrip"),
        pytest.param(bpe(unk_token="[UNK]", fuse_unk=True), id="fused-unknowns"),
        pytest.param(
            Tokenizer(models.WordPiece({"a": 0, "[UNK]": 1}, unk_token="[UNK]")), id="wordpiece"
        ),
    ],
)
def test_no_bound_where_characters_may_vanish(tokenizer: Tokenizer) -> None:
    assert max_chars_per_token(wrapped(tokenizer)) is None


def test_no_bound_for_a_slow_tokenizer() -> None:
    assert max_chars_per_token(object()) is None


# -- workers -----------------------------------------------------------------------------


def test_worker_gives_the_ids_and_texts_of_transformers(smol: Any) -> None:
    worker = TokenizerWorker(copy.deepcopy(smol))
    assert worker._rust is not None  # the direct path is the one under test
    for text in ["<|im_start|>user\nHi<|im_end|>", "  a , b 's\n\n", "ünï 🤖", SENTENCE * 20]:
        for add_special_tokens in (True, False):
            expected = smol.encode(text, add_special_tokens=add_special_tokens)
            encoded = worker.encode(text, add_special_tokens, None)
            assert encoded.token_ids == expected and encoded.num_tokens == len(expected)
            assert worker.decode(expected) == smol.decode(expected)
    over = worker.encode(SENTENCE * 20, True, max_num_ids=10)
    assert over.token_ids is None and over.num_tokens == len(smol.encode(SENTENCE * 20))


def test_worker_falls_back_where_transformers_differs(smol: Any) -> None:
    tokenizer = copy.deepcopy(smol)
    tokenizer.clean_up_tokenization_spaces = True  # transformers then edits decoded text
    tokenizer.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output = True
    worker = TokenizerWorker(tokenizer)
    assert worker._rust is None
    ids = smol.encode("a , b .", add_special_tokens=False)
    assert worker.decode(ids) == tokenizer.decode(ids) == "a, b."


# -- the pool ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pool(smol: Any) -> TokenizerPool:
    return TokenizerPool(smol, max_model_len=8192, num_threads=2)


async def _longest_loop_gap(work: Any) -> tuple[Any, float]:
    """Run ``work`` (awaitable) while a task notes the longest pause of the event loop."""
    longest = 0.0
    done = False

    async def tick() -> None:
        nonlocal longest
        last = time.perf_counter()
        while not done:
            await asyncio.sleep(0.002)
            now = time.perf_counter()
            longest, last = max(longest, now - last), now

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0.01)  # the ticker is running before the work starts
    try:
        result = await work
    finally:
        done = True
        await ticker
    return result, longest


def test_tokenizing_leaves_the_loop_free(smol: Any) -> None:
    pool = TokenizerPool(smol, max_model_len=2**15, num_threads=1)
    text = SENTENCE * 40_000  # 1.8 M characters, within the bound: tokenized (seconds)
    started = time.perf_counter()
    token_ids, longest_gap = asyncio.run(
        _longest_loop_gap(pool.encode(text, True, "prompt", within_context=False))
    )
    elapsed = time.perf_counter() - started
    assert len(token_ids) == 400_001
    # On the loop, the loop would pause for the whole tokenization.
    assert longest_gap < min(0.1, elapsed / 4), (elapsed, longest_gap)


def test_work_runs_on_pool_threads(pool: TokenizerPool) -> None:
    names = asyncio.run(pool.run(lambda worker: threading.current_thread().name))
    assert names.startswith("kvplane-tokenizer")


def test_text_too_long_for_the_context_is_refused_untokenized(pool: TokenizerPool) -> None:
    assert pool.max_prompt_chars == 8191 * SMOL_MAX_CHARS_PER_TOKEN
    pool.check_length("x" * pool.max_prompt_chars, "prompt")
    with pytest.raises(APIError) as refused:
        pool.check_length("x" * (pool.max_prompt_chars + 1), "prompt")
    error = refused.value
    assert error.status == 400 and error.param == "prompt"
    assert error.message.startswith(
        "This model's maximum context length is 8192 tokens, but the prompt has at least 8192 "
        f"tokens: it is {pool.max_prompt_chars + 1} characters long"
    )


def test_prompt_over_the_context_is_refused_with_its_count(pool: TokenizerPool, smol: Any) -> None:
    text = SENTENCE * 1000  # over 8192 tokens, within the character bound
    num_tokens = len(smol.encode(text))
    assert num_tokens > 8192
    with pytest.raises(APIError) as refused:
        asyncio.run(pool.encode(text, True, "prompt"))
    assert f"but the prompt has {num_tokens} tokens" in refused.value.message
    assert len(asyncio.run(pool.encode(text, True, "prompt", within_context=False))) == num_tokens
