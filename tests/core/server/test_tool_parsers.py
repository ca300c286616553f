"""Tool-call parsers on hand-written outputs, whole and streamed, and forced tool calls."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace
from typing import Any

import pytest

from kvplane.server.tool_parsers import (
    TOOL_PARSERS,
    HermesToolParser,
    MistralToolParser,
    ToolCall,
    ToolParser,
    detect_tool_parser_name,
    get_tool_parser,
    tool_choice_constraint,
)

WEATHER = {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
TIME = {"name": "get_time", "arguments": {}}

# (parser, output text, expected content, expected calls as (name, arguments object))
CASES: list[tuple[str, str, str | None, list[tuple[str, Any]]]] = [
    (
        "hermes",
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": '
        '{"city": "Paris", "unit": "celsius"}}\n</tool_call>\n<tool_call>\n'
        '{"name": "get_time", "arguments": {}}\n</tool_call>',
        "Let me check.",
        [("get_weather", WEATHER["arguments"]), ("get_time", {})],
    ),
    (
        "hermes",
        '<tool_call>{"arguments": {"q": "a \\"quoted\\" } brace"}, "name": "search"}</tool_call>',
        None,
        [("search", {"q": 'a "quoted" } brace'})],
    ),
    ("hermes", "Plain answer, no tools.  ", "Plain answer, no tools.  ", []),
    ("hermes", "Use <tool_c and </tool_call> as text", "Use <tool_c and </tool_call> as text", []),
    (
        "hermes",
        '<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}\n'
        "</tool_call>",
        None,
        [("get_weather", {"city": "Oslo"})],  # arguments written as a JSON string
    ),
    (
        "llama3_json",
        '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}; '
        '{"name": "get_time", "parameters": {}}',
        None,
        [("get_weather", WEATHER["arguments"]), ("get_time", {})],
    ),
    (
        "llama3_json",
        '<|python_tag|>{"type": "function", "name": "get_time", "parameters": {"tz": "UTC"}}',
        None,
        [("get_time", {"tz": "UTC"})],
    ),
    ("llama3_json", '{"name": "Alice", "age": 30}', '{"name": "Alice", "age": 30}', []),
    ("llama3_json", "The answer is 4.", "The answer is 4.", []),
    (
        "mistral",
        'Sure. [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", '
        '"unit": "celsius"}}, {"name": "get_time", "arguments": {}}]',
        "Sure.",
        [("get_weather", WEATHER["arguments"]), ("get_time", {})],
    ),
    (
        "mistral",
        '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "celsius"}'
        '[TOOL_CALLS]get_time[ARGS]{"tz": "UTC"}',
        None,
        [("get_weather", WEATHER["arguments"]), ("get_time", {"tz": "UTC"})],
    ),
    ("mistral", "No calls [TOOL", "No calls [TOOL", []),
    (
        "hermes",  # escapes and numbers that a chunk boundary can cut in half
        '<tool_call>{"name": "book", "arguments": {"city": "S\\u00e3o \\ud83d\\ude00 ✓", '
        '"guests": [{"age": -12.5e-1, "vip": true}, {"deep": {"n": 1234567}}]}}</tool_call>',
        None,
        [
            (
                "book",
                {
                    "city": "São \U0001f600 ✓",
                    "guests": [{"age": -1.25, "vip": True}, {"deep": {"n": 1234567}}],
                },
            )
        ],
    ),
    (
        "mistral",
        '[TOOL_CALLS]count[ARGS]{"n": 100, "xs": [1.5, -2]}',
        None,
        [("count", {"n": 100, "xs": [1.5, -2]})],
    ),
]


def stream(parser: ToolParser, text: str, chunk_sizes: list[int]) -> dict[str, Any]:
    """Feed ``text`` in chunks; accumulate what an OpenAI client would."""
    content = ""
    calls: dict[int, dict[str, Any]] = {}
    previous = ""
    sizes = iter(chunk_sizes)
    while len(previous) < len(text):
        current = text[: len(previous) + next(sizes)]
        delta = parser.extract_tool_calls_streaming(previous, current, current[len(previous) :])
        previous = current
        if delta is None:
            continue
        assert delta.content or delta.tool_calls  # never an empty delta
        content += delta.content or ""
        for fragment in delta.tool_calls:
            if fragment.index not in calls:
                assert fragment.id and fragment.name, "a call's first fragment names it"
                assert fragment.index == len(calls), "calls are announced in order"
                calls[fragment.index] = {"id": fragment.id, "name": fragment.name, "args": ""}
            else:
                assert fragment.id is None and fragment.name is None
            calls[fragment.index]["args"] += fragment.arguments or ""
    final = parser.finish_streaming(text)
    if final is not None:
        assert not final.tool_calls
        content += final.content or ""
    return {"content": content, "calls": [calls[i] for i in sorted(calls)]}


@pytest.mark.parametrize(("parser_name", "text", "content", "calls"), CASES)
def test_extract_whole_output(
    parser_name: str, text: str, content: str | None, calls: list[tuple[str, Any]]
) -> None:
    got_content, got_calls = TOOL_PARSERS[parser_name]().extract_tool_calls(text)
    assert got_content == content
    assert [(call.name, json.loads(call.arguments)) for call in got_calls] == calls
    assert all(isinstance(call, ToolCall) and call.type == "function" for call in got_calls)
    assert len({call.id for call in got_calls}) == len(got_calls)


@pytest.mark.parametrize("chunking", ["chars", "random"])
@pytest.mark.parametrize(("parser_name", "text", "content", "calls"), CASES)
def test_streaming_matches_whole_output(
    parser_name: str, text: str, content: str | None, calls: list[Any], chunking: str
) -> None:
    rng = random.Random(len(text))
    sizes = [1 if chunking == "chars" else rng.randint(1, 6) for _ in range(len(text))]
    streamed = stream(TOOL_PARSERS[parser_name](), text, sizes)
    expected_content, expected_calls = TOOL_PARSERS[parser_name]().extract_tool_calls(text)
    assert streamed["content"] == (expected_content or "")
    assert [(c["name"], c["args"]) for c in streamed["calls"]] == [
        (call.name, call.arguments) for call in expected_calls
    ]


def test_streaming_emits_arguments_as_they_arrive() -> None:
    parser = HermesToolParser()
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'
    assert parser.extract_tool_calls_streaming("", "<tool_c", "<tool_c") is None  # held back
    delta = parser.extract_tool_calls_streaming("<tool_c", text, text[7:])
    assert delta is not None and delta.content is None
    (fragment,) = delta.tool_calls
    assert (fragment.index, fragment.name, fragment.arguments) == (
        0,
        "get_weather",
        '{"city": "Par',
    )
    more = parser.extract_tool_calls_streaming(text, text + 'is"}', 'is"}')
    assert more is not None and more.tool_calls[0].arguments == 'is"}'


def test_malformed_call_stays_content() -> None:
    # A cut-off call is reported as a call (see test_truncated_calls.py), never as text.
    truncated = 'Hi <tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa'
    content, calls = HermesToolParser().extract_tool_calls(truncated)
    assert content == "Hi" and [(c.name, c.arguments) for c in calls] == [
        ("get_weather", '{"city": "Pa')
    ]
    malformed = '<tool_call>\n{"name": "f", "arguments": {"a": 1}, oops}\n</tool_call> bye'
    assert HermesToolParser().extract_tool_calls(malformed) == (malformed, [])
    no_name = '<tool_call>{"arguments": {}}</tool_call>'
    assert HermesToolParser().extract_tool_calls(no_name) == (no_name, [])


def test_mistral_ids_and_special_tokens() -> None:
    _, calls = MistralToolParser().extract_tool_calls(
        '[TOOL_CALLS][{"name": "get_time", "arguments": {}}]'
    )
    assert len(calls[0].id) == 9 and calls[0].id.isalnum()
    assert MistralToolParser.skip_special_tokens is False
    assert HermesToolParser.skip_special_tokens is True


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{% for m in messages %}<tool_call>{{ m }}</tool_call>{% endfor %}", "hermes"),
        ("[AVAILABLE_TOOLS]{{ tools }}[/AVAILABLE_TOOLS][TOOL_CALLS]", "mistral"),
        ("{{- '<|python_tag|>' + tool_call.name }}", "llama3_json"),
        ({"default": "plain", "tool_use": "{{ '<tool_call>' }}"}, "hermes"),
        ("<|im_start|>{{ message.content }}<|im_end|>", "hermes"),  # SmolLM2: no tools
        (None, "hermes"),
    ],
)
def test_parser_chosen_by_chat_template(template: Any, expected: str) -> None:
    assert detect_tool_parser_name(template) == expected
    parser = get_tool_parser(SimpleNamespace(chat_template=template))
    assert parser.name == expected
    assert get_tool_parser(SimpleNamespace(chat_template=template)) is not parser  # per request


def test_parser_by_name() -> None:
    assert isinstance(get_tool_parser(None, "mistral"), MistralToolParser)
    with pytest.raises(ValueError, match="unknown tool parser"):
        get_tool_parser(None, "nope")


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["city", "days"],
            },
        },
    },
    {"type": "function", "function": {"name": "get_time"}},
]
NAMED_WEATHER = {"type": "function", "function": {"name": "get_weather"}}


def test_tool_choice_without_constraint() -> None:
    assert tool_choice_constraint(TOOLS, "auto") is None
    assert tool_choice_constraint(TOOLS, "none") is None
    assert tool_choice_constraint(TOOLS, None) is None
    assert tool_choice_constraint(TOOLS, "required").structural_tag is not None  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("tools", "choice", "message"),
    [
        (TOOLS, {"type": "function", "function": {"name": "nope"}}, "not in tools"),
        ([], "required", "at least one tool"),
        (TOOLS, "sometimes", "tool_choice must be"),
        ([{"type": "function", "function": {}}], "required", "function.name"),
        ([{"type": "retrieval"}], "required", "tools must be"),
        (
            [{"type": "function", "function": {"name": "f", "parameters": [1]}}],
            "required",
            "parameters must be",
        ),
    ],
)
def test_tool_choice_errors(tools: Any, choice: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tool_choice_constraint(tools, choice)


@pytest.fixture(scope="module")
def compiler() -> Any:
    from kvplane.models.config import load_tokenizer
    from kvplane.models.source import resolve_model
    from kvplane.structured import StructuredOutputCompiler

    return StructuredOutputCompiler(load_tokenizer(resolve_model(None, "auto")), 49152, [2])


def accepts(compiler: Any, params: Any, text: str) -> bool:
    """Whether ``text`` is a complete match of the compiled constraint."""
    import xgrammar

    matcher = xgrammar.GrammarMatcher(compiler.compile(params))
    return bool(matcher.accept_string(text)) and bool(matcher.is_completed())


@pytest.mark.parametrize("parser_name", sorted(TOOL_PARSERS))
def test_forced_calls_parse_and_follow_the_schema(compiler: Any, parser_name: str) -> None:
    parser = TOOL_PARSERS[parser_name]()
    begin = parser._call_begin
    end = parser._call_end

    def call(name: str, arguments: str) -> str:
        return begin.format(name=json.dumps(name)) + arguments + end

    good = call("get_weather", '{"city": "Paris", "days": 2}')
    two = parser._separator.join([good, call("get_time", "{}")])
    wrap = parser._prefix + "{}" + parser._suffix
    named = parser.tool_choice_constraint(TOOLS, NAMED_WEATHER)
    required = parser.tool_choice_constraint(TOOLS, "required")
    single = parser.tool_choice_constraint(TOOLS, "required", parallel_tool_calls=False)

    assert accepts(compiler, named, wrap.format(good))
    assert accepts(compiler, required, wrap.format(two))
    assert not accepts(compiler, named, wrap.format(two))
    assert not accepts(compiler, single, wrap.format(two))
    assert not accepts(compiler, named, wrap.format(call("get_weather", '{"city": "Paris"}')))
    assert not accepts(compiler, required, wrap.format(call("get_news", "{}")))
    assert not accepts(compiler, required, "Sure! " + wrap.format(good))
    # What the constraint allows, the parser reads back.
    content, calls = TOOL_PARSERS[parser_name]().extract_tool_calls(wrap.format(two))
    assert content is None
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris", "days": 2}),
        ("get_time", {}),
    ]
