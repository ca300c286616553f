"""Stop rules and streaming hold-back of text that may become a stop string."""

from __future__ import annotations

from typing import Any

import pytest

from kvplane.sampling import SamplingParams, StopChecker, StopResult, check_stop, text_to_emit
from kvplane.sampling.stop import NOT_FINISHED, partial_stop_len

EOS = 2


def check(
    output: list[int],
    text: str = "",
    new_chars: int = 0,
    prompt_len: int = 4,
    max_model_len: int | None = None,
    **params: Any,
) -> StopResult:
    return check_stop(
        SamplingParams(**params),
        frozenset({EOS}),
        output,
        prompt_len,
        max_model_len,
        text,
        new_chars,
    )


def test_eos_stops_and_its_text_is_cut() -> None:
    assert check([5, EOS]) == StopResult(True, "stop", None, None)
    # EOS decoded as visible text (skip_special_tokens=False) is cut from the output...
    assert check([5, EOS], "hi</s>", 4) == StopResult(True, "stop", None, 2)
    # ...unless the user asked for stop text in the output.
    assert check([5, EOS], "hi</s>", 4, include_stop_str_in_output=True).truncated_text_len is None
    assert check([5, EOS], ignore_eos=True) == NOT_FINISHED


def test_stop_token_ids() -> None:
    result = check([5, 9], "ab", 1, stop_token_ids=[9, 11])
    assert result == StopResult(True, "stop", 9, 1)
    assert check([9, 5], stop_token_ids=[9]) == NOT_FINISHED  # only the last token counts


def test_min_tokens_prevents_stopping_except_at_the_context_limit() -> None:
    assert check([EOS], min_tokens=2) == NOT_FINISHED
    assert check([5, 9], stop_token_ids=[9], min_tokens=3) == NOT_FINISHED
    assert check([1, 1], "xx STOP", 7, stop=["STOP"], min_tokens=3) == NOT_FINISHED
    assert check([5, 5, EOS], min_tokens=2).finish_reason == "stop"
    at_limit = check([5, EOS], prompt_len=6, max_model_len=8, min_tokens=5)
    assert at_limit == StopResult(True, "length")


def test_length() -> None:
    assert check([1] * 16) == StopResult(True, "length")  # max_tokens defaults to 16
    assert check([1] * 15) == NOT_FINISHED
    assert check([1] * 3, max_tokens=3).finish_reason == "length"
    assert check([1] * 500, max_tokens=None) == NOT_FINISHED
    assert check([1] * 4, prompt_len=6, max_model_len=10, max_tokens=None).finish_reason == "length"
    assert check([1] * 3, prompt_len=6, max_model_len=10, max_tokens=None) == NOT_FINISHED
    # A stop on the very last allowed token reports "stop".
    assert check([1, 1, EOS], max_tokens=3).finish_reason == "stop"


def test_stop_strings_cut_the_text() -> None:
    text = "Hello world. Bye"
    result = check([1, 2, 3], text, 6, stop=["world", "."])
    # "world" started before the new chars but ends inside them; "." is later.
    assert result == StopResult(True, "stop", "world", 6)
    with_stop = check([1, 2, 3], text, 6, stop=["world"], include_stop_str_in_output=True)
    assert with_stop.truncated_text_len == 11  # "Hello world", the rest still dropped
    # Earliest match wins, whatever the list order; equal starts prefer the longer string.
    assert check([1], "a<end>b", 7, stop=["b", "<end>"]).stop_reason == "<end>"
    assert check([1], "xa<ab", 5, stop=["<a", "<ab"]).stop_reason == "<ab"


def test_stop_strings_are_only_searched_near_the_new_text() -> None:
    # "STOP" lies wholly in text checked at an earlier step (e.g. blocked by min_tokens).
    assert check([1, 1], "STOP and more", 4, stop=["STOP"]) == NOT_FINISHED
    assert check([1, 1], "STOP and more", 0, stop=["STOP"]) == NOT_FINISHED
    assert check([1, 1], "xxSTOP", 1, stop=["STOP"]).truncated_text_len == 2


def test_stop_checker_binds_max_model_len() -> None:
    checker = StopChecker(max_model_len=5)
    result = checker.check(SamplingParams(max_tokens=None), {EOS}, [1, 1], num_prompt_tokens=3)
    assert result.finish_reason == "length"


@pytest.mark.parametrize(
    ("text", "expected"),
    [("abc", 0), ("ab<", 1), ("ab</", 2), ("ab</s", 3), ("</s>x", 0), ("xx#", 1), ("", 0)],
)
def test_partial_stop_len(text: str, expected: int) -> None:
    assert partial_stop_len(text, ["</s>", "##"]) == expected


def stream(chunks: list[str], stop: list[str], include: bool = False) -> tuple[list[str], str]:
    """Drive check_stop + text_to_emit as the engine loop does; return emitted pieces."""
    params = SamplingParams(stop=stop, include_stop_str_in_output=include, max_tokens=None)
    text, emitted, pieces = "", 0, []
    for i, chunk in enumerate(chunks):
        text += chunk
        result = check_stop(params, frozenset(), [1] * (i + 1), 1, None, text, len(chunk))
        if result.truncated_text_len is not None:
            text = text[: result.truncated_text_len]
        piece = text_to_emit(text, emitted, stop, result.finished)
        pieces.append(piece)
        emitted += len(piece)
        if result.finished:
            break
    else:
        pieces.append(text_to_emit(text, emitted, stop, finished=True))
    assert "".join(pieces) == text
    return pieces, text


def test_streaming_holds_back_a_stop_string_split_across_chunks() -> None:
    pieces, text = stream(["Hello", " wor", "ld <", "|e", "nd|", "> ignored"], ["<|end|>"])
    assert text == "Hello world "
    assert pieces == ["Hello", " wor", "ld ", "", "", ""]
    pieces, text = stream(["a<", "|e", "nd|>b"], ["<|end|>"], include=True)
    assert (pieces, text) == (["a", "", "<|end|>"], "a<|end|>")


def test_streaming_releases_a_tail_that_cannot_match_any_more() -> None:
    pieces, text = stream(["Hi <", "|en", "try", " ok"], ["<|end|>"])
    assert pieces == ["Hi ", "", "<|entry", " ok", ""]
    assert text == "Hi <|entry ok"
    pieces, _ = stream(["x#", "#y"], ["##", "#!"])
    assert pieces == ["x", ""]  # "##" matched across the chunk boundary


def test_text_to_emit_releases_everything_when_finished() -> None:
    assert text_to_emit("abc<|e", 0, ["<|end|>"], finished=False) == "abc"
    assert text_to_emit("abc<|e", 3, ["<|end|>"], finished=True) == "<|e"
    assert text_to_emit("abc<|e", 0, [], finished=False) == "abc<|e"
    # Never re-emits text already shown, even if it now looks like a stop prefix.
    assert text_to_emit("ab<", 3, ["<x"], finished=False) == ""
