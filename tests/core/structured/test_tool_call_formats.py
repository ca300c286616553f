"""Tool-call formats on text that is still arriving: every prefix, cut-off and malformed JSON."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from itertools import pairwise

import pytest

from kvplane.server.tool_parsers import HermesToolParser, Llama3JsonToolParser
from kvplane.structured.tool_call_formats import (
    ParsedCall,
    ParsedOutput,
    parse_hermes,
    parse_llama3_json,
    parse_mistral,
)

Parse = Callable[[str, bool], ParsedOutput]

# Strings that stress a scanner: escapes (also cut in half by a prefix), surrogate pairs,
# raw non-ASCII, brackets and quotes inside strings, the formats' own markers.
STRINGS = ["São", "\U0001f600", 'a "quoted" } ] brace', "back\\slash\n\ttab", "</tool_call>", ""]
NUMBERS = [0, -7, 1234567, -1.5e-7, 2.5e300, 0.125]


def random_value(rng: random.Random, depth: int = 0) -> object:
    kind = rng.random()
    if depth > 2 or kind < 0.4:
        return rng.choice([*STRINGS, *NUMBERS, True, False, None])
    if kind < 0.75:
        return {f"k{i}": random_value(rng, depth + 1) for i in range(rng.randint(0, 3))}
    return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]


def random_arguments_json(rng: random.Random) -> str:
    arguments = {"a": random_value(rng), "b": random_value(rng, 1), "c": rng.choice(NUMBERS)}
    return json.dumps(
        arguments,
        ensure_ascii=rng.random() < 0.5,  # \\uXXXX escapes or the characters themselves
        indent=rng.choice([None, 2]),
        separators=rng.choice([None, (",", ":")]),
    )


def random_output(rng: random.Random, style: str) -> tuple[Parse, str, list[str]]:
    """A parser, an output with 1-2 calls in its format, and each call's arguments text."""
    arguments = [random_arguments_json(rng) for _ in range(rng.randint(1, 2))]
    objects = [f'{{"name": "tool_{i}", "arguments": {a}}}' for i, a in enumerate(arguments)]
    if style == "hermes":
        text = "Sure. " + "".join(f"<tool_call>\n{o}\n</tool_call>\n" for o in objects)
        return parse_hermes, text, arguments
    if style == "llama3_json":
        objects = [o.replace('"arguments"', '"parameters"') for o in objects]
        return parse_llama3_json, "<|python_tag|>" + "; ".join(objects), arguments
    if style == "mistral":
        return parse_mistral, "[TOOL_CALLS][" + ", ".join(objects) + "]", arguments
    text = "".join(f"[TOOL_CALLS]tool_{i}[ARGS]{a}" for i, a in enumerate(arguments))
    return parse_mistral, text, arguments


@pytest.mark.parametrize("style", ["hermes", "llama3_json", "mistral", "mistral_args"])
def test_every_prefix_streams_the_written_arguments(style: str) -> None:
    rng = random.Random(style)
    for _ in range(15):
        parse, text, arguments = random_output(rng, style)
        for end in range(len(text) + 1):
            for call in parse(text[:end], False).calls:
                assert not call.is_malformed, text[:end]
                index = int(call.name.removeprefix("tool_")) if call.name else None
                if index is not None:
                    assert call.name == f"tool_{index}"  # only once the name is complete
                    assert arguments[index].startswith(call.arguments), text[:end]
        calls = parse(text, True).calls
        assert [(c.name, c.arguments, c.is_complete) for c in calls] == [
            (f"tool_{i}", a, True) for i, a in enumerate(arguments)
        ]


@pytest.mark.parametrize(
    "prefix",
    [
        '{"city": "S\\u00',  # a \\uXXXX escape cut in half
        '{"city": "\\ud83d\\ude',  # a surrogate pair cut in half
        '{"city": "a\\',  # a backslash waiting for its escape
        '{"n": 12',  # 12 may still become 123
        '{"n": -',
        '{"n": 1.',
        '{"n": 1.5e',
        '{"ok": tr',
        '{"deep": {"er": [{"x": [1, ',
    ],
)
def test_cut_off_arguments_stream_as_written(prefix: str) -> None:
    (call,) = parse_hermes('<tool_call>{"name": "f", "arguments": ' + prefix, False).calls
    assert (call.name, call.arguments, call.is_complete, call.is_malformed) == (
        "f",
        prefix,
        False,
        False,
    )


def test_partial_number_streams_and_adds_up() -> None:
    # Arguments are the model's text, not a re-serialized value: "12" sent before "3" is
    # still right once concatenated, so partial numbers need not be held back.
    parser = HermesToolParser()
    text = '<tool_call>{"name": "f", "arguments": {"n": 123}}</tool_call>'
    cut = text.index("23")
    first = parser.extract_tool_calls_streaming("", text[:cut], text[:cut])
    rest = parser.extract_tool_calls_streaming(text[:cut], text, text[cut:])
    assert first is not None and first.tool_calls[0].arguments == '{"n": 1'
    assert rest is not None and rest.tool_calls[0].arguments == "23}"


def test_scalar_arguments_appear_when_complete() -> None:
    assert parse_mistral("[TOOL_CALLS]f[ARGS]12", False).calls[0].arguments == ""
    assert parse_mistral("[TOOL_CALLS]f[ARGS]1.", False).calls[0].is_malformed is False
    # A literal ends where the next marker starts (it used to swallow "[TOOL_CALLS").
    pieces = parse_mistral("[TOOL_CALLS]f[ARGS]true[TOOL_CALLS]g[ARGS]{}", True).pieces
    calls = [piece for piece in pieces if isinstance(piece, ParsedCall)]
    assert [(c.name, c.arguments, c.is_complete) for c in calls] == [
        ("f", "true", True),
        ("g", "{}", True),
    ]


@pytest.mark.parametrize(
    "arguments",
    ['{"a": oops', '{"a": ]', '{"a": 1 "b"', '{"a": "x\\q', '{"a": [1,,', '{"a": "x"]', "{1: 2"],
)
def test_malformed_arguments_stop_the_call(arguments: str) -> None:
    text = '<tool_call>{"name": "f", "arguments": ' + arguments
    (call,) = parse_hermes(text, False).calls
    assert (call.name, call.arguments, call.is_malformed) == ("f", "", True)
    whole = text + "}</tool_call>"
    assert HermesToolParser().extract_tool_calls(whole) == (whole, [])


def test_malformed_arguments_stop_streaming() -> None:
    parser = HermesToolParser()
    start = '<tool_call>{"name": "f", "arguments": {"a": '
    steps = ["", start, start + "oo", start + "oops}}"]
    sent = ""
    for previous, current in pairwise(steps):
        delta = parser.extract_tool_calls_streaming(previous, current, current[len(previous) :])
        if delta is not None:
            sent += "".join(fragment.arguments or "" for fragment in delta.tool_calls)
    assert sent == '{"a": '  # nothing after the value turned out malformed


def test_malformed_field_makes_the_call_incomplete() -> None:
    # Garbage in a field other than the arguments used to pass (only arguments were parsed).
    text = '<tool_call>{"name": "f", "arguments": {}, "id": oops}</tool_call>'
    assert HermesToolParser().extract_tool_calls(text) == (text, [])


def test_llama_object_that_cannot_be_a_call_is_text_at_once() -> None:
    # Malformed JSON cannot become a call: no need to hold it back until it ends.
    text = '{"name": "x", "type": oops'
    delta = Llama3JsonToolParser().extract_tool_calls_streaming("", text, text)
    assert delta is not None and delta.content == text and not delta.tool_calls
