"""When a sequence stops, and how much of its text a stream may show so far.

The engine calls :func:`check_stop` after appending a token (and its detokenized text) to
a sequence, then :func:`text_to_emit` to decide what a streaming client gets. Both are
pure functions of their arguments.
"""

from __future__ import annotations

from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

from kvplane.sampling.params import SamplingParams

#: ``finish_reason`` values, as in the OpenAI API.
FINISH_STOP = "stop"
FINISH_LENGTH = "length"


@dataclass(frozen=True, slots=True)
class StopResult:
    """Whether the sequence is finished, and why.

    ``finish_reason`` is ``"stop"`` (EOS, a stop token or a stop string) or ``"length"``
    (``max_tokens`` or the context limit). ``stop_reason`` is the matched stop token id or
    stop string; ``None`` for EOS and for length. ``truncated_text_len`` is the length the
    output text must be cut to (the stop string and anything after it, or the stop token's
    text), or ``None`` to keep the text as it is.
    """

    finished: bool
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    truncated_text_len: int | None = None


NOT_FINISHED = StopResult(finished=False)


def check_stop(
    params: SamplingParams,
    eos_token_ids: AbstractSet[int],
    output_token_ids: Sequence[int],
    num_prompt_tokens: int,
    max_model_len: int | None,
    output_text: str = "",
    num_new_chars: int = 0,
) -> StopResult:
    """Decide whether the sequence stops after its last token ``output_token_ids[-1]``.

    ``output_text`` is the whole output text so far, of which the last ``num_new_chars``
    characters came with the last token (the detokenizer's delta); only stop strings that
    end inside those characters are looked for, earlier text was checked before.

    Order: nothing stops a sequence with fewer than ``min_tokens`` output tokens except
    the context limit; then EOS (unless ``ignore_eos``), ``stop_token_ids``, stop strings
    (the earliest match in the text wins), and last ``max_tokens`` / ``max_model_len``.
    The text of a stop token (EOS included) is cut unless ``include_stop_str_in_output``.
    """
    num_output = len(output_token_ids)
    if num_output == 0:
        return NOT_FINISHED
    at_context_limit = max_model_len is not None and num_prompt_tokens + num_output >= max_model_len
    if num_output < params.min_tokens:
        return StopResult(True, FINISH_LENGTH) if at_context_limit else NOT_FINISHED

    last_token = output_token_ids[-1]
    drop_token_text = num_new_chars > 0 and not params.include_stop_str_in_output
    token_text_end = len(output_text) - num_new_chars if drop_token_text else None
    if not params.ignore_eos and last_token in eos_token_ids:
        return StopResult(True, FINISH_STOP, None, token_text_end)
    if last_token in (params.stop_token_ids or ()):
        return StopResult(True, FINISH_STOP, last_token, token_text_end)

    match = find_stop_string(output_text, num_new_chars, params.stop or [])
    if match is not None:
        start, stop_str = match
        end = start + len(stop_str) if params.include_stop_str_in_output else start
        return StopResult(True, FINISH_STOP, stop_str, end)

    if at_context_limit or (params.max_tokens is not None and num_output >= params.max_tokens):
        return StopResult(True, FINISH_LENGTH)
    return NOT_FINISHED


def find_stop_string(
    text: str, num_new_chars: int, stop_strings: Sequence[str]
) -> tuple[int, str] | None:
    """The earliest stop string ending within the last ``num_new_chars`` characters.

    Returns ``(start index, stop string)``; on equal starts the longer string wins.
    """
    if num_new_chars <= 0 or not stop_strings:
        return None
    best: tuple[int, str] | None = None
    new_start = len(text) - num_new_chars
    for stop_str in stop_strings:
        # A match must end after new_start, so it starts after new_start - len(stop_str).
        index = text.find(stop_str, max(0, new_start - len(stop_str) + 1))
        if index < 0:  # str.find's own "not found"
            continue
        if best is None or index < best[0] or (index == best[0] and len(stop_str) > len(best[1])):
            best = (index, stop_str)
    return best


def text_to_emit(
    text: str,
    num_already_emitted: int,
    stop_strings: Sequence[str],
    finished: bool,
) -> str:
    """The next chunk of ``text`` a stream may show, after ``num_already_emitted`` chars.

    While not finished, a tail of ``text`` that is a proper prefix of some stop string is
    held back (it might become a stop string that must not be shown); it is released as
    soon as it can no longer match, or when the sequence finishes (``text`` then already
    truncated by :func:`check_stop`). Never returns text before ``num_already_emitted``.
    """
    if finished or not stop_strings:
        return text[num_already_emitted:]
    end = max(num_already_emitted, len(text) - partial_stop_len(text, stop_strings))
    return text[num_already_emitted:end]


def partial_stop_len(text: str, stop_strings: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    longest = 0
    for stop_str in stop_strings:
        for length in range(min(len(stop_str) - 1, len(text)), longest, -1):
            if text.endswith(stop_str[:length]):
                longest = length
                break
    return longest


class StopChecker:
    """:func:`check_stop` bound to the model's context length, for the engine loop."""

    def __init__(self, max_model_len: int | None) -> None:
        self.max_model_len = max_model_len

    def check(
        self,
        params: SamplingParams,
        eos_token_ids: AbstractSet[int],
        output_token_ids: Sequence[int],
        num_prompt_tokens: int,
        output_text: str = "",
        num_new_chars: int = 0,
    ) -> StopResult:
        """See :func:`check_stop`."""
        return check_stop(
            params,
            eos_token_ids,
            output_token_ids,
            num_prompt_tokens,
            self.max_model_len,
            output_text,
            num_new_chars,
        )
