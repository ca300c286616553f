"""Compile structured-output constraints against a tokenizer's vocabulary, with xgrammar.

One :class:`StructuredOutputCompiler` per engine (built lazily on the first constrained
request). The tokenizer's vocabulary is scanned once per tokenizer (``xgrammar.TokenizerInfo``,
shared by engines that share the tokenizer object); compiled grammars are cached by
:attr:`StructuredOutputParams.key`, so a schema reused across requests compiles once.

xgrammar is imported lazily: an engine that never sees a constrained request never loads it.
"""

from __future__ import annotations

import logging
import re
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from kvplane.structured.constraint import GrammarConstraint
from kvplane.structured.params import StructuredOutputParams

logger = logging.getLogger(__name__)

#: Compiled grammars kept per compiler (LRU); a compiled JSON schema is small (KiBs).
DEFAULT_CACHE_ENTRIES = 512

#: Longest run of whitespace allowed between JSON tokens. Unbounded whitespace lets a model
#: (small ones especially) loop on newlines until max_tokens; 16 still fits pretty-printing
#: to a depth of 7 with two-space indent.
MAX_JSON_WHITESPACE = 16

# TokenizerInfo per tokenizer object, per (vocab_size, eos ids): scanning a vocabulary of
# 150k tokens takes ~1 s, and it depends on nothing else.
_TOKENIZER_INFO: weakref.WeakKeyDictionary[Any, dict[tuple[int, tuple[int, ...]], Any]] = (
    weakref.WeakKeyDictionary()
)
_TOKENIZER_INFO_LOCK = threading.Lock()

# xgrammar prefixes its C++ errors with "[hh:mm:ss] /path/file.cc:123: " and sometimes
# "Check failed: (...) is false: "; the user needs only the message.
_ERROR_PREFIX = re.compile(r"^\[[\d:]+\]\s*\S+:\d+:\s*(Check failed: .*? is false:\s*)?")


def import_xgrammar() -> Any:
    """The ``xgrammar`` module; ``ValueError`` naming the install command when missing."""
    try:
        import xgrammar
    except ImportError as e:  # pragma: no cover - xgrammar is a declared dependency
        raise ValueError(
            "structured output needs the xgrammar package: pip install 'xgrammar>=0.2.8'"
        ) from e
    return xgrammar


def tokenizer_info(tokenizer: Any, vocab_size: int, eos_token_ids: Iterable[int]) -> Any:
    """``xgrammar.TokenizerInfo`` for ``tokenizer``, built once per tokenizer object.

    ``vocab_size`` is the model's (logits width); ids the tokenizer does not have are never
    allowed. ``eos_token_ids`` become the grammar's stop tokens: allowed exactly when the
    grammar can end.
    """
    xgr = import_xgrammar()
    key = (int(vocab_size), tuple(sorted(set(eos_token_ids))))
    with _TOKENIZER_INFO_LOCK:
        per_tokenizer = _TOKENIZER_INFO.setdefault(tokenizer, {})
        if key not in per_tokenizer:
            per_tokenizer[key] = xgr.TokenizerInfo.from_huggingface(
                tokenizer, vocab_size=key[0], stop_token_ids=list(key[1])
            )
        return per_tokenizer[key]


class StructuredOutputCompiler:
    """Turns :class:`StructuredOutputParams` into per-sequence :class:`GrammarConstraint`\\ s.

    Called by the engine thread (``add_request``); the cache is guarded by a lock so a
    server may also pre-compile from another thread.
    """

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        eos_token_ids: Iterable[int],
        max_cache_entries: int = DEFAULT_CACHE_ENTRIES,
        max_threads: int = 4,
    ) -> None:
        if tokenizer is None:
            raise ValueError("structured output needs a tokenizer, and this engine has none")
        xgr = import_xgrammar()
        self.vocab_size = vocab_size
        self.eos_token_ids = frozenset(eos_token_ids)
        self._info = tokenizer_info(tokenizer, vocab_size, self.eos_token_ids)
        # xgrammar's own cache is off: ours is keyed by the canonical params and bounded.
        self._compiler = xgr.GrammarCompiler(
            self._info, max_threads=max_threads, cache_enabled=False
        )
        self._cache: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._max_cache_entries = max_cache_entries
        self._lock = threading.Lock()

    def compile(self, params: StructuredOutputParams) -> Any:
        """The ``xgrammar.CompiledGrammar`` for ``params`` (cached).

        Raises ``ValueError`` with xgrammar's message when the schema, regex, grammar or
        structural tag is invalid or uses an unsupported feature.
        """
        key = params.key
        with self._lock:
            compiled = self._cache.get(key)
            if compiled is not None:
                self._cache.move_to_end(key)
                return compiled
        compiled = self._compile_uncached(params)
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > self._max_cache_entries:
                self._cache.popitem(last=False)
        return compiled

    def new_constraint(self, params: StructuredOutputParams) -> GrammarConstraint:
        """A fresh matcher for one sequence (compiles ``params`` if not cached)."""
        return GrammarConstraint(self.compile(params), self.vocab_size)

    @property
    def num_cached(self) -> int:
        return len(self._cache)

    def _compile_uncached(self, params: StructuredOutputParams) -> Any:
        kind = params.kind
        compiler = self._compiler
        try:
            if kind == "json_schema":
                return compiler.compile_json_schema(
                    params.json_schema,
                    any_whitespace=True,
                    max_whitespace_cnt=MAX_JSON_WHITESPACE,
                    strict_mode=True,
                )
            if kind == "json_object":
                # Any object: strict mode would close {"type": "object"} to "{}".
                return compiler.compile_json_schema(
                    {"type": "object"},
                    any_whitespace=True,
                    max_whitespace_cnt=MAX_JSON_WHITESPACE,
                    strict_mode=False,
                )
            if kind == "regex":
                return compiler.compile_regex(params.regex)
            if kind == "grammar":
                return compiler.compile_grammar(params.grammar)
            return compiler.compile_structural_tag(params.structural_tag)
        except Exception as e:  # xgrammar raises RuntimeError, pydantic or its own errors
            raise ValueError(f"invalid {kind} for structured output: {_clean_error(e)}") from e


def _clean_error(error: Exception) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    message = _ERROR_PREFIX.sub("", lines[0]) if lines else type(error).__name__
    if len(lines) > 1:
        message += " " + " ".join(lines[1:3])
    return message[:500]
