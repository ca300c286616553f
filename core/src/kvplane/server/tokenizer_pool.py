"""Tokenizer work off the event loop: prompts, chat templates, ``/tokenize`` and
``/detokenize`` run on a few threads, each with its own copy of the tokenizer.

Why threads keep the loop free: the Rust ("fast") tokenizer releases the GIL while it
encodes a batch, so ``/health`` and the streams go on while a long prompt is tokenized.
What still holds the GIL grows with the number of tokens made into Python objects (the
id list; the token strings and offsets of a full ``Encoding``, freed under the GIL), so
:class:`TokenizerWorker` encodes without token strings and lists no ids for a prompt
that is too long anyway, and :mod:`kvplane.server.prompt_limits` refuses, before
tokenizing, text that cannot fit the context.

Why copies: a Rust tokenizer used from two threads at once fails with "Already borrowed"
when one of them changes a setting, as transformers does before an encode.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import queue
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

from kvplane.sampling.detokenizer import PROBE_TEXTS
from kvplane.server.prompt_limits import check_num_chars, check_num_tokens, max_chars_per_token

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Most pool threads: tokenizing is one core per request, and every thread holds a copy.
MAX_NUM_THREADS = 4


@dataclass(frozen=True, slots=True)
class Encoded:
    """A tokenized text: its number of tokens, and their ids unless there were too many
    to list (None)."""

    num_tokens: int
    token_ids: list[int] | None


class TokenizerWorker:
    """One tokenizer copy, used by one pool thread at a time."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._rust = _equivalent_rust_tokenizer(tokenizer)

    def encode(self, text: str, add_special_tokens: bool, max_num_ids: int | None) -> Encoded:
        """``text``'s tokens as ``tokenizer.encode`` gives them; the ids are left out when
        there are more than ``max_num_ids`` (None: no limit)."""
        if self._rust is None:
            token_ids = list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))
            too_many = max_num_ids is not None and len(token_ids) > max_num_ids
            return Encoded(len(token_ids), None if too_many else token_ids)
        # encode_batch_fast: no offsets (cheap to free); the batch call releases the GIL.
        (encoding,) = self._rust.encode_batch_fast([text], add_special_tokens=add_special_tokens)
        num_tokens = len(encoding)
        if max_num_ids is not None and num_tokens > max_num_ids:
            return Encoded(num_tokens, None)
        return Encoded(num_tokens, encoding.ids)

    def decode(self, token_ids: list[int]) -> str:
        """The text of ``token_ids`` as ``tokenizer.decode`` gives it."""
        if self._rust is None:
            return str(self.tokenizer.decode(token_ids))
        # The batch call releases the GIL (a single decode holds it throughout).
        (text,) = self._rust.decode_batch([token_ids], skip_special_tokens=False)
        return str(text)


class TokenizerPool:
    """Runs tokenizer work on ``num_threads`` threads (see the module docstring).

    Created at start-up (the copies are made then); its methods are called on the
    event-loop thread, and the work passed to :meth:`run` runs on a pool thread.
    """

    def __init__(self, tokenizer: Any, max_model_len: int, num_threads: int | None = None) -> None:
        num_threads = num_threads or default_num_threads()
        self.max_model_len = max_model_len
        #: See :func:`~kvplane.server.prompt_limits.max_chars_per_token` (None: no bound).
        self.max_chars_per_token = max_chars_per_token(tokenizer)
        #: Longer texts are refused untokenized (None: every text is tokenized).
        self.max_prompt_chars = (
            None
            if self.max_chars_per_token is None
            else (max_model_len - 1) * self.max_chars_per_token
        )
        self._idle: queue.SimpleQueue[TokenizerWorker] = queue.SimpleQueue()
        for _ in range(num_threads):
            self._idle.put(TokenizerWorker(copy.deepcopy(tokenizer)))
        self._executor = ThreadPoolExecutor(num_threads, thread_name_prefix="kvplane-tokenizer")
        logger.debug(
            "tokenizer pool: %d threads; prompts over %s characters are refused untokenized",
            num_threads,
            self.max_prompt_chars,
        )

    async def run(self, work: Callable[[TokenizerWorker], T]) -> T:
        """``work(worker)`` on a pool thread; what it raises is raised here."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._run_on_worker, work)

    def check_length(self, text: str, param: str) -> None:
        """400 when ``text`` is too long to fit the context whatever its tokens; cheap
        (no tokenizing), any thread."""
        check_num_chars(len(text), self.max_chars_per_token, self.max_model_len, param)

    def check_fits(self, encoded: Encoded, param: str) -> list[int]:
        """The ids of ``encoded``; 400 when it leaves no room in the context."""
        check_num_tokens(encoded.num_tokens, self.max_model_len, param)
        assert encoded.token_ids is not None  # listed up to max_model_len - 1 tokens
        return encoded.token_ids

    async def encode(
        self, text: str, add_special_tokens: bool, param: str, *, within_context: bool = True
    ) -> list[int]:
        """``text``'s token ids, tokenized on a pool thread. Refuses (400) text that cannot
        fit the context before tokenizing it; with ``within_context``, every prompt that
        does not fit (``/tokenize`` counts the tokens of longer ones)."""
        self.check_length(text, param)
        max_num_ids = self.max_model_len - 1 if within_context else None
        encoded = await self.run(partial(_encode, text, add_special_tokens, max_num_ids))
        if within_context:
            return self.check_fits(encoded, param)
        assert encoded.token_ids is not None
        return encoded.token_ids

    async def decode(self, token_ids: list[int]) -> str:
        return await self.run(partial(_decode, token_ids))

    def _run_on_worker(self, work: Callable[[TokenizerWorker], T]) -> T:
        worker = self._idle.get()  # never waits: there are as many workers as threads
        try:
            return work(worker)
        finally:
            self._idle.put(worker)


def _encode(
    text: str, add_special_tokens: bool, max_num_ids: int | None, worker: TokenizerWorker
) -> Encoded:
    return worker.encode(text, add_special_tokens, max_num_ids)


def _decode(token_ids: list[int], worker: TokenizerWorker) -> str:
    return worker.decode(token_ids)


def default_num_threads() -> int:
    """One thread per usable core, at most :data:`MAX_NUM_THREADS`."""
    usable = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    num_cores = len(usable) if usable is not None else (os.cpu_count() or 1)
    return max(1, min(MAX_NUM_THREADS, num_cores))


def _equivalent_rust_tokenizer(tokenizer: Any) -> Any | None:
    """``tokenizer``'s Rust tokenizer when calling it directly gives the ids that
    ``tokenizer.encode`` gives and the texts ``tokenizer.decode`` gives (checked on a few
    texts), else None."""
    rust = getattr(tokenizer, "backend_tokenizer", None)
    if rust is None or not hasattr(rust, "encode_batch_fast"):
        return None
    # transformers sets this before each encode of its own; set once here, the same way.
    rust.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))
    special = list(getattr(tokenizer, "all_special_tokens", []))[:4]
    for text in (*PROBE_TEXTS, "".join(special) + " x"):
        for add_special_tokens in (True, False):
            expected = list(tokenizer.encode(text, add_special_tokens=add_special_tokens))
            (encoding,) = rust.encode_batch_fast([text], add_special_tokens=add_special_tokens)
            (decoded,) = rust.decode_batch([expected], skip_special_tokens=False)
            if encoding.ids != expected or decoded != tokenizer.decode(expected):
                logger.info("tokenizer: calling the Rust tokenizer directly differs; not used")
                return None
    return rust
