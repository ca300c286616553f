"""How long a prompt may be: the 400s for one that cannot fit the context, and the bound
that finds most of those from the text's length alone, before tokenizing it.

The bound: if no token stands for more than ``K`` characters of input text, a text of
``C`` characters has at least ``ceil(C / K)`` tokens, so one longer than
``(max_model_len - 1) * K`` characters cannot fit and is refused without tokenizing
(tokenizing a 15 MB prompt takes tens of seconds). ``K`` is read once from the tokenizer
(:func:`max_chars_per_token`); a tokenizer whose pipeline may drop or merge input
characters gives no ``K``, and its prompts are always tokenized.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from kvplane.server.errors import APIError, bad_request

#: Normalizers that never make the text shorter.
_KEEPING_NORMALIZERS = frozenset({"Lowercase", "NFD", "NFKD", "Prepend", "ByteLevel"})
#: Composing normalizers: one output character comes from at most 4 input characters
#: (the longest canonical decomposition in Unicode, e.g. U+1FAF).
_COMPOSING_NORMALIZERS = frozenset({"NFC", "NFKC"})
_MAX_COMPOSED_CHARS = 4
#: Pre-tokenizers that keep every character (Split and Punctuation unless "Removed").
_KEEPING_PRE_TOKENIZERS = frozenset(
    {"ByteLevel", "Metaspace", "Digits", "UnicodeScripts", "FixedLength", "Split", "Punctuation"}
)


def check_num_tokens(num_tokens: int, max_model_len: int, param: str) -> None:
    """400 for a prompt of ``num_tokens`` that leaves no room in the context."""
    if num_tokens >= max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens, but the prompt "
            f"has {num_tokens} tokens (at least one token must be generated).",
            param,
        )


def check_num_chars(
    num_chars: int, max_chars_per_token: int | None, max_model_len: int, param: str
) -> None:
    """400 for a text of ``num_chars`` characters that has too many tokens to fit the
    context whatever they are (see the module docstring); cheap, so it runs before
    tokenizing. ``max_chars_per_token`` None: no bound, nothing refused."""
    if max_chars_per_token is None or num_chars <= (max_model_len - 1) * max_chars_per_token:
        return
    raise prompt_too_long(num_chars, max_chars_per_token, max_model_len, param)


def prompt_too_long(
    num_chars: int, max_chars_per_token: int, max_model_len: int, param: str
) -> APIError:
    min_num_tokens = math.ceil(num_chars / max_chars_per_token)
    return bad_request(
        f"This model's maximum context length is {max_model_len} tokens, but the prompt "
        f"has at least {min_num_tokens} tokens: it is {num_chars} characters long and no "
        f"token spans more than {max_chars_per_token} (at least one token must be generated).",
        param,
    )


def max_chars_per_token(tokenizer: Any) -> int | None:
    """The most characters of input text one token of ``tokenizer`` can stand for, or
    None when its pipeline gives no such bound: a slow (Python) tokenizer, or one that
    may drop input characters (whitespace-splitting or stripping steps), fuse unknown
    ones into one token, or let an added token swallow the whitespace around it.

    Sound because each step is known: a token's string is at least as long as the
    normalized text it covers (byte-level BPE spells each byte as one character, a
    SentencePiece ``▁`` stands for one space, byte-fallback tokens ``<0x..>`` for one
    byte), and each allowed normalizer shrinks the text by a known factor at most.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    spec = json.loads(backend.to_str())
    shrink = _normalizer_shrink(spec.get("normalizer"))
    if (
        shrink is None
        or not _keeps_characters(spec.get("pre_tokenizer"))
        or not _has_bounded_unknowns(spec.get("model") or {})
        or any(token.get("lstrip") or token.get("rstrip") for token in spec["added_tokens"])
    ):
        return None
    longest = max((len(token) for token in backend.get_vocab(with_added_tokens=True)), default=0)
    return max(longest, 1) * shrink


def _normalizer_shrink(spec: Mapping[str, Any] | None) -> int | None:
    """By how much at most the normalizer can shorten a text; None: unbounded or unknown."""
    if spec is None:
        return 1
    kind = spec.get("type")
    if kind == "Sequence":
        factor = 1
        for part in spec.get("normalizers", []):
            part_factor = _normalizer_shrink(part)
            if part_factor is None:
                return None
            factor *= part_factor
        return factor
    if kind in _KEEPING_NORMALIZERS:
        return 1
    if kind in _COMPOSING_NORMALIZERS:
        return _MAX_COMPOSED_CHARS
    if kind == "Replace":
        pattern = spec.get("pattern") or {}
        content = spec.get("content") or ""
        if "String" not in pattern or not content:
            return None  # a regex can match any length; an empty content deletes
        return max(1, math.ceil(len(pattern["String"]) / len(content)))
    return None  # Strip, StripAccents, Nmt, Precompiled, BertNormalizer: may drop characters


def _keeps_characters(spec: Mapping[str, Any] | None) -> bool:
    if spec is None:
        return True
    kind = spec.get("type")
    if kind == "Sequence":
        return all(_keeps_characters(part) for part in spec.get("pretokenizers", []))
    return kind in _KEEPING_PRE_TOKENIZERS and spec.get("behavior") != "Removed"


def _has_bounded_unknowns(spec: Mapping[str, Any]) -> bool:
    """Whether a token for unknown input stands for one character at most (a fused
    unknown token stands for a whole run)."""
    kind = spec.get("type")
    if kind == "BPE":
        fuses_unknowns = spec.get("fuse_unk") and spec.get("unk_token") is not None
        return bool(spec.get("byte_fallback") or not fuses_unknowns)
    if kind == "Unigram":
        return bool(spec.get("byte_fallback") or spec.get("unk_id") is None)
    return False  # WordPiece, WordLevel: an unknown word of any length is one token
