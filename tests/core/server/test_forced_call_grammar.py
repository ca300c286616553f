"""The grammar of a forced tool call (``tool_choice``): where it may end, token by token.

xgrammar allows EOS exactly when the text so far is a complete match, so "may end here" is
``is_completed()`` on the string matcher and the EOS bit of the real token-level bitmask.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import xgrammar

from kvplane.server.tool_parsers import TOOL_PARSERS, ToolParser
from kvplane.structured import StructuredOutputCompiler, StructuredOutputParams

EOS_TOKEN_ID = 2  # SmolLM2's <|im_end|>

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    },
    {"type": "function", "function": {"name": "get_time"}},
]
NAMED_WEATHER = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from kvplane.models.config import load_tokenizer
    from kvplane.models.source import resolve_model

    return load_tokenizer(resolve_model(None, "auto"))


@pytest.fixture(scope="module")
def compiler(tokenizer: Any) -> StructuredOutputCompiler:
    return StructuredOutputCompiler(tokenizer, 49152, [EOS_TOKEN_ID])


def call_text(parser: ToolParser, name: str, arguments: str) -> str:
    return parser._call_begin.format(name=json.dumps(name)) + arguments + parser._call_end


def may_end_after(compiler: StructuredOutputCompiler, params: Any, text: str) -> bool:
    """Whether the constraint accepts ``text`` and then allows the output to end."""
    matcher = xgrammar.GrammarMatcher(compiler.compile(params))
    assert matcher.accept_string(text), f"the grammar rejects {text!r}"
    return bool(matcher.is_completed())


def accepts(compiler: StructuredOutputCompiler, params: Any, text: str) -> bool:
    return bool(xgrammar.GrammarMatcher(compiler.compile(params)).accept_string(text))


def allowed_token_ids(
    compiler: StructuredOutputCompiler, tokenizer: Any, params: Any, text: str
) -> set[int]:
    """The tokens the engine's constraint allows after the tokens of ``text``."""
    token_ids = tokenizer.encode(text)
    constraint = compiler.new_constraint(params)
    bitmask = constraint(token_ids)
    assert bitmask is not None and not constraint.is_failed
    return {
        32 * word + bit
        for word, value in enumerate(bitmask.tolist())
        for bit in range(32)
        if (value >> bit) & 1
    }


@pytest.mark.parametrize("parser_name", sorted(TOOL_PARSERS))
def test_required_parallel_may_end_after_any_call(
    compiler: StructuredOutputCompiler, parser_name: str
) -> None:
    parser = TOOL_PARSERS[parser_name]()
    required = parser.tool_choice_constraint(TOOLS, "required")
    one = parser._prefix + call_text(parser, "get_weather", '{"city": "Oslo"}')
    two = one + parser._separator + call_text(parser, "get_time", "{}")
    three = two + parser._separator + call_text(parser, "get_time", "{}")

    assert not may_end_after(compiler, required, parser._prefix)  # at least one call
    assert may_end_after(compiler, required, one + parser._suffix)
    assert may_end_after(compiler, required, two + parser._suffix)
    assert may_end_after(compiler, required, three + parser._suffix)


def test_newline_after_a_call_does_not_force_another(
    compiler: StructuredOutputCompiler, tokenizer: Any
) -> None:
    parser = TOOL_PARSERS["hermes"]()
    required = parser.tool_choice_constraint(TOOLS, "required")
    one = call_text(parser, "get_weather", '{"city": "Oslo"}')
    two = one + "\n" + call_text(parser, "get_time", "{}")

    # The model's newline after a call leaves both ways open: the end, or another call.
    assert may_end_after(compiler, required, one + "\n")
    assert may_end_after(compiler, required, two)
    assert may_end_after(compiler, required, two + "\n")
    # Only the separator: no blank lines, no text after the calls.
    assert not accepts(compiler, required, one + "\n\n")
    assert not accepts(compiler, required, one + "\nDone.")
    # The same, token by token, as the engine applies it.
    allowed = allowed_token_ids(compiler, tokenizer, required, one + "\n")
    assert EOS_TOKEN_ID in allowed
    assert allowed == {EOS_TOKEN_ID, 44}  # 44 is "<": the start of <tool_call>


@pytest.mark.parametrize("parser_name", ["llama3_json", "mistral"])
def test_a_written_separator_commits_to_another_call(
    compiler: StructuredOutputCompiler, parser_name: str
) -> None:
    parser = TOOL_PARSERS[parser_name]()
    required = parser.tool_choice_constraint(TOOLS, "required")
    one = parser._prefix + call_text(parser, "get_weather", '{"city": "Oslo"}')
    assert not may_end_after(compiler, required, one + parser._separator)


@pytest.mark.parametrize("parser_name", sorted(TOOL_PARSERS))
@pytest.mark.parametrize("choice", ["single", "named"])
def test_one_call_then_only_the_end(
    compiler: StructuredOutputCompiler, tokenizer: Any, parser_name: str, choice: str
) -> None:
    parser = TOOL_PARSERS[parser_name]()
    params: StructuredOutputParams | None
    if choice == "named":
        params = parser.tool_choice_constraint(TOOLS, NAMED_WEATHER)
    else:
        params = parser.tool_choice_constraint(TOOLS, "required", parallel_tool_calls=False)
    one = parser._prefix + call_text(parser, "get_weather", '{"city": "Oslo"}') + parser._suffix

    assert may_end_after(compiler, params, one)
    assert allowed_token_ids(compiler, tokenizer, params, one) == {EOS_TOKEN_ID}
    assert not accepts(compiler, params, one + parser._separator)
    assert not accepts(compiler, params, one + "\n")
