"""Outputs cut off by ``max_tokens`` anywhere inside forced calls: streamed and whole agree.

The contract (docs/structured-output.md): the complete calls are calls; the cut-off call is a
call with the arguments written so far once they have begun, and absent before that; its
markup is never content.
"""

from __future__ import annotations

import json
import random

import pytest

from kvplane.server.tool_parsers import TOOL_PARSERS, HermesToolParser, ToolParser
from tests.core.server.test_tool_parsers import stream

CALLS = [
    ("get_weather", '{\n    "city": "São Paulo",\n    "days": [1, 2.5e1, -3]\n}'),
    ("get_time", "{}"),
    ("get_weather", '{"city": "Oslo \\"N\\"", "ok": true}'),
]
#: Where the first call's opening marker ends: a cut before it is plain text, as in "auto".
MARKERS = {"hermes": "<tool_call>", "llama3_json": "", "mistral": "[TOOL_CALLS]"}


def forced_output(parser: ToolParser) -> str:
    """What a forced ``required`` constraint lets the model write: three calls."""
    calls = [parser._call_begin.format(name=json.dumps(n)) + a + parser._call_end for n, a in CALLS]
    return parser._prefix + parser._separator.join(calls) + parser._suffix


@pytest.mark.parametrize("parser_name", sorted(TOOL_PARSERS))
def test_every_cut_reads_the_same_streamed_and_whole(parser_name: str) -> None:
    full = forced_output(TOOL_PARSERS[parser_name]())
    rng = random.Random(parser_name)
    num_calls_before = 0
    for cut in range(len(MARKERS[parser_name]), len(full) + 1):
        text = full[:cut]
        content, calls = TOOL_PARSERS[parser_name]().extract_tool_calls(text)
        sizes = [rng.randint(1, 7) for _ in range(len(text) + 1)]
        streamed = stream(TOOL_PARSERS[parser_name](), text, sizes)
        whole = [(call.name, call.arguments) for call in calls]

        assert streamed["content"] == (content or ""), text
        assert [(c["name"], c["args"]) for c in streamed["calls"]] == whole, text
        assert content is None, f"markup as content for {text!r}"
        assert all(arguments for _, arguments in whole), f"a call without arguments: {text!r}"
        for (name, arguments), (true_name, true_arguments) in zip(whole, CALLS, strict=False):
            assert name == true_name and true_arguments.startswith(arguments)
        assert all(json.loads(arguments) is not None for _, arguments in whole[:-1])
        assert len(whole) >= num_calls_before  # a call, once reported, stays
        num_calls_before = len(whole)
    assert num_calls_before == len(CALLS)


def test_a_call_cut_before_its_arguments_is_not_reported() -> None:
    # Reporting it would make a call with empty arguments, which clients read as {}.
    for text in (
        '<tool_call>\n{"name": "get_weather", "arguments": ',
        '<tool_call>\n{"name": "get_weather", "argu',
        '<tool_call>\n{"name": "get_wea',
    ):
        assert HermesToolParser().extract_tool_calls(text) == (None, [])
        assert stream(HermesToolParser(), text, [3] * len(text)) == {"content": "", "calls": []}


def test_cut_off_markup_after_a_call_is_not_content() -> None:
    call = '<tool_call>\n{"name": "get_time", "arguments": {}}'
    closed = call + "\n</tool_call>"
    # Cut in the call's closing, or in the next call's opening.
    for text in (call + "\n</tool_ca", closed + "\n<", closed + "\n<tool_c"):
        content, calls = HermesToolParser().extract_tool_calls(text)
        assert content is None and [c.name for c in calls] == ["get_time"], text
    # Text after a call that merely ends like a marker's start stays text.
    content, _ = HermesToolParser().extract_tool_calls(closed + "\nsee <")
    assert content == "see <"
