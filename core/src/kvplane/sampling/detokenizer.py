"""Incremental detokenization: text deltas per generated token, safe for multi-byte text.

Decoding one token at a time is wrong for byte-level BPE and byte-fallback sentencepiece:
a CJK character or an emoji is often split over several tokens, each of which alone
decodes to U+FFFD. The usual two-offset window technique fixes it: decode a short window
``ids[prefix_offset:]`` and the same window without the new tokens
``ids[prefix_offset:read_offset]``; the difference is the new text. While the window ends
in an incomplete character (the decode ends with U+FFFD) nothing is emitted and the
offsets stay, so the bytes are decoded together once the character is complete.

Decoding windows with ``tokenizer.decode`` (rather than converting tokens to strings by
hand) keeps ``skip_special_tokens`` and the tokenizer's decoder pipeline (byte fallback,
metaspace, leading-space strip) exactly as in a one-shot decode. Where the tokenizer's
Rust ``decode`` gives the same texts (checked once per tokenizer, :func:`rust_decoder`),
it is called directly: transformers' wrapper costs more than the decode it wraps.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any

_REPLACEMENT_CHAR = "\ufffd"
#: Texts on which calling a tokenizer's Rust side directly must give what transformers
#: gives before kvplane does so (here for decoding, in the server's tokenizer pool for
#: encoding): multi-byte and byte-fallback pieces, runs of spaces, tabs and newlines, and
#: the spaces before punctuation that transformers' clean-up would remove.
PROBE_TEXTS = (
    "Hello, world! It's 3.14 -- isn't it?",
    "  two  spaces\n\nand\ttabs  ",
    "naïve café — 日本語 🤖 ünïcödé",
    "a , b . c 's d n't ?",
)
# Per tokenizer: its Rust decode, if that gives what ``tokenizer.decode`` gives, else None.
_rust_decoders: weakref.WeakKeyDictionary[Any, Callable[..., str] | None] = (
    weakref.WeakKeyDictionary()
)
# Prompt tokens decoded in front of the output when use_prompt_context is set (vLLM's 5).
_NUM_PROMPT_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Turns one sequence's output tokens into text, one token at a time.

    Contract: after all tokens were added and :meth:`flush` was called, :attr:`text`
    equals ``tokenizer.decode(output_ids, skip_special_tokens=...,
    clean_up_tokenization_spaces=False)`` (clean-up rewrites text across token
    boundaries, which a stream cannot take back; transformers 5 skips it for BPE anyway).
    No delta ever ends in an incomplete UTF-8 sequence. One known gap, shared with vLLM:
    with a byte-fallback tokenizer, bytes that are *invalid* UTF-8 (not merely incomplete)
    right after a complete character can make the final text differ from a one-shot decode,
    whose ByteFallback step replaces a whole invalid byte run; byte-level BPE is exact.

    With ``use_prompt_context=True`` the first output tokens are decoded after the last
    prompt tokens, as vLLM does: a sentencepiece tokenizer then keeps the leading space of
    the first output word (``" Paris"`` rather than ``"Paris"``), so ``prompt + output``
    reads right; byte-level BPE gives the same text either way.

    ``spaces_between_special_tokens`` is passed to ``decode``; only tokenizers whose
    decode honours it (slow tokenizers before transformers 5) change behaviour.
    One instance per sequence; not thread-safe.
    """

    def __init__(
        self,
        tokenizer: Any,  # transformers.PreTrainedTokenizerBase
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
        *,
        use_prompt_context: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.spaces_between_special_tokens = spaces_between_special_tokens
        # Window token ids: optional prompt context, then every output token.
        self._ids: list[int] = (
            list(prompt_token_ids[-_NUM_PROMPT_CONTEXT_TOKENS:]) if use_prompt_context else []
        )
        self._num_context = len(self._ids)
        self._prefix_offset = 0
        self._read_offset = self._num_context  # tokens before this one are in _text
        self._text = ""
        # Two decodes per token: transformers' wrapper around the Rust call costs more
        # than the decode itself, so the Rust call is made directly where it is the same.
        self._rust_decode = rust_decoder(tokenizer) if spaces_between_special_tokens else None

    @property
    def text(self) -> str:
        """All output text emitted so far (held-back bytes excluded until complete)."""
        return self._text

    @property
    def output_token_ids(self) -> list[int]:
        """The output tokens added so far (a copy)."""
        return self._ids[self._num_context :]

    @property
    def num_pending_tokens(self) -> int:
        """Tokens added but not yet turned into text (an incomplete character)."""
        return len(self._ids) - self._read_offset

    def add_token(self, token_id: int) -> str:
        """Append one output token and return the text it completes (maybe ``""``)."""
        self._ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Emit whatever is held back, even an incomplete character (as U+FFFD).

        Called by the engine when the sequence finishes, so that :attr:`text` matches a
        one-shot decode even if generation stopped in the middle of a character.
        """
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset :])
        if len(full_text) <= len(prefix_text):
            return ""  # e.g. a skipped special token: nothing new yet
        if not final and full_text.endswith(_REPLACEMENT_CHAR):
            return ""  # incomplete UTF-8 sequence: wait for the rest of its bytes
        delta = full_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._text += delta
        return delta

    def _decode(self, token_ids: list[int]) -> str:
        if not token_ids:
            return ""
        if self._rust_decode is not None:
            return self._rust_decode(token_ids, skip_special_tokens=self.skip_special_tokens)
        return self.tokenizer.decode(
            token_ids,
            skip_special_tokens=self.skip_special_tokens,
            clean_up_tokenization_spaces=False,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
        )


def rust_decoder(tokenizer: Any) -> Callable[..., str] | None:
    """``tokenizer``'s Rust ``decode`` when it gives what ``tokenizer.decode(...,
    clean_up_tokenization_spaces=False)`` gives (checked once per tokenizer on whole and
    cut-short token windows of a few texts, both ways of ``skip_special_tokens``), else None."""
    try:
        return _rust_decoders[tokenizer]
    except KeyError:
        pass
    except TypeError:  # not weakly referenceable: check, but do not remember
        return _checked_rust_decoder(tokenizer)
    decoder = _checked_rust_decoder(tokenizer)
    _rust_decoders[tokenizer] = decoder
    return decoder


def _checked_rust_decoder(tokenizer: Any) -> Callable[..., str] | None:
    rust = getattr(tokenizer, "backend_tokenizer", None)
    if rust is None or not hasattr(rust, "decode"):
        return None
    special = "".join(list(getattr(tokenizer, "all_special_tokens", []))[:4])
    try:
        for text in (*PROBE_TEXTS, special + " x " + special):
            token_ids = list(tokenizer.encode(text, add_special_tokens=True))
            # Every window from the start: cut-short ones end inside multi-byte characters.
            for end in range(1, len(token_ids) + 1):
                for skip in (True, False):
                    window = token_ids[:end]
                    expected = tokenizer.decode(
                        window, skip_special_tokens=skip, clean_up_tokenization_spaces=False
                    )
                    if rust.decode(window, skip_special_tokens=skip) != expected:
                        return None
    except Exception:  # an unusual tokenizer: keep transformers' decode
        return None
    return rust.decode  # type: ignore[no-any-return]
