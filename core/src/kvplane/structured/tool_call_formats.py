"""Split model output into text and tool calls, for each tool-call format, as text arrives.

The parsers in :mod:`kvplane.server.tool_parsers` build on these functions. Each
``parse_*(text, final)`` returns the pieces of ``text`` in order: plain text and
:class:`ParsedCall`\\ s. With ``final=False`` (streaming) the result for a prefix of a text
is always a prefix of the result for the longer text: a partial marker at the end
(``<tool_ca``) is held back instead of shown as text, a call's ``name`` appears only once its
string is complete, and its ``arguments`` only grow. A call cut off by the end of the text
is kept as an incomplete call; parsing stops at malformed call JSON (``is_malformed``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from kvplane.structured.partial_json import (
    MalformedJSON,
    scan_object,
    skip_whitespace,
    value_end,
)

HERMES_START = "<tool_call>"
HERMES_END = "</tool_call>"
LLAMA_PYTHON_TAG = "<|python_tag|>"
MISTRAL_START = "[TOOL_CALLS]"
MISTRAL_ARGS = "[ARGS]"
_LLAMA_KEYS = frozenset({"name", "parameters", "arguments", "type"})


@dataclass
class ParsedCall:
    """A tool call found in the text, possibly still being written.

    ``arguments`` is the JSON text of the arguments written so far (only once ``name`` is
    known); ``is_complete`` when the call ended with valid JSON arguments. ``raw`` is the
    call's source text, shown as content when a finished output has an unfinished call.
    """

    name: str | None = None
    arguments: str = ""
    is_complete: bool = False
    is_malformed: bool = False
    raw: str = ""


@dataclass
class ParsedOutput:
    pieces: list[str | ParsedCall] = field(default_factory=list)
    is_final: bool = False

    @property
    def calls(self) -> list[ParsedCall]:
        return [piece for piece in self.pieces if isinstance(piece, ParsedCall)]


def parse_hermes(text: str, final: bool) -> ParsedOutput:
    """``<tool_call>{"name": ..., "arguments": ...}</tool_call>``, any number, text around."""
    out = ParsedOutput(is_final=final)
    pos = 0
    while True:
        start = text.find(HERMES_START, pos)
        if start < 0:
            out.pieces.append(text[pos:] if final else _hold_partial(text[pos:], HERMES_START))
            return out
        out.pieces.append(text[pos:start])
        call, end = _json_call(text, skip_whitespace(text, start + len(HERMES_START)))
        out.pieces.append(call)
        if end is None or not call.is_complete:
            call.raw = text[start:]
            return out
        pos = _skip_closing(text, end, HERMES_END, final)


def parse_llama3_json(text: str, final: bool) -> ParsedOutput:
    """``{"name": ..., "parameters": ...}``, ``;``-separated, as the whole output.

    Text that does not start with such an object is plain text. While the first object's
    keys do not yet show whether it is a call, nothing is returned (streaming holds it).
    """
    out = ParsedOutput(is_final=final)
    pos = skip_whitespace(text, 0)
    if text.startswith(LLAMA_PYTHON_TAG, pos):
        pos = skip_whitespace(text, pos + len(LLAMA_PYTHON_TAG))
    elif not final and LLAMA_PYTHON_TAG.startswith(text[pos:]):
        return out  # empty or a partial <|python_tag|>: undecided
    is_tagged = pos > 0 and text.startswith(LLAMA_PYTHON_TAG, skip_whitespace(text, 0))
    while True:
        if pos >= len(text) or text[pos] != "{":
            if not out.pieces and not (is_tagged and pos >= len(text)):
                out.pieces.append(text)
            elif pos < len(text):
                out.pieces.append(text[pos:])
            return out
        scan = scan_object(text, pos)
        keys = set(scan.fields)
        is_call = (
            "name" in keys and bool(keys & {"parameters", "arguments"}) and keys <= _LLAMA_KEYS
        )
        if not is_call:
            if scan.is_complete or scan.is_malformed or not keys <= _LLAMA_KEYS:
                # Not a call: the whole output (or the rest of it) is plain text.
                out.pieces.append(text if not out.pieces else text[pos:])
            elif final:
                out.pieces.append(ParsedCall(raw=text[pos:]))
            return out
        call, end = _json_call(text, pos)
        out.pieces.append(call)
        if end is None or not call.is_complete:
            call.raw = text[pos:]
            return out
        pos = skip_whitespace(text, end)
        if pos < len(text) and text[pos] == ";":
            pos = skip_whitespace(text, pos + 1)
        elif pos >= len(text):
            return out


def parse_mistral(text: str, final: bool) -> ParsedOutput:
    """``[TOOL_CALLS][{...}, ...]`` or ``[TOOL_CALLS]name[ARGS]{...}``, text before."""
    out = ParsedOutput(is_final=final)
    pos = 0
    while True:
        start = text.find(MISTRAL_START, pos)
        if start < 0:
            out.pieces.append(text[pos:] if final else _hold_partial(text[pos:], MISTRAL_START))
            return out
        out.pieces.append(text[pos:start])
        pos = skip_whitespace(text, start + len(MISTRAL_START))
        if pos >= len(text):
            out.pieces.append(ParsedCall(raw=text[start:]))
            return out
        if text[pos] == "[":
            next_pos = _mistral_array(text, pos, out)
        else:
            next_pos = _mistral_named(text, pos, out)
        if next_pos is None:
            return out
        pos = next_pos


def _mistral_array(text: str, pos: int, out: ParsedOutput) -> int | None:
    """Calls of ``[{...}, {...}]`` at ``pos``; the position after ``]`` or None to stop."""
    pos = skip_whitespace(text, pos + 1)
    while True:
        call, end = _json_call(text, pos)
        out.pieces.append(call)
        if end is None or not call.is_complete:
            call.raw = text[pos:]
            return None
        pos = skip_whitespace(text, end)
        if pos >= len(text):
            return None
        if text[pos] == "]":
            return pos + 1
        if text[pos] != ",":
            out.pieces.append(text[pos:])  # not a call list after all: the rest is text
            return None
        pos = skip_whitespace(text, pos + 1)


def _mistral_named(text: str, pos: int, out: ParsedOutput) -> int | None:
    """One ``name[ARGS]{...}`` call at ``pos``; the position after it or None to stop."""
    args_at = text.find(MISTRAL_ARGS, pos)
    call = ParsedCall(raw=text[pos:])
    out.pieces.append(call)
    if args_at < 0:
        return None
    call.name = text[pos:args_at].strip()
    start = skip_whitespace(text, args_at + len(MISTRAL_ARGS))
    try:
        end = value_end(text, start)
    except MalformedJSON:
        call.is_malformed = True
        return None
    call.arguments = _arguments_text(text, start, end)
    call.is_complete = end is not None and _is_json(call.arguments)
    return end if call.is_complete else None


def _json_call(text: str, pos: int) -> tuple[ParsedCall, int | None]:
    """The call in the object at ``pos`` and the position after it (None: cut off/invalid)."""
    call = ParsedCall()
    if pos >= len(text):
        return call, None
    if text[pos] != "{":
        call.is_malformed = True
        return call, None
    scan = scan_object(text, pos)
    call.is_malformed = scan.is_malformed
    name_span = scan.fields.get("name")
    if name_span is not None and name_span[1] is not None:
        name = _loads(text[name_span[0] : name_span[1]])
        if isinstance(name, str):
            call.name = name
    args_span = scan.fields.get("arguments") or scan.fields.get("parameters")
    if call.name is not None and args_span is not None:
        call.arguments = _arguments_text(text, *args_span)
    if scan.is_complete:
        if call.name is not None and args_span is None:
            call.arguments = "{}"  # a function without parameters
        call.is_complete = call.name is not None and _is_json(call.arguments)
        call.is_malformed = not call.is_complete
    return call, scan.end


def _arguments_text(text: str, start: int, end: int | None) -> str:
    """Arguments JSON text: an object or array streams as written; a string is decoded."""
    if start >= len(text):
        return ""
    if text[start] in "{[":
        return text[start:end]
    if end is None:
        return ""  # a string or scalar appears when complete
    value = _loads(text[start:end])
    return value if isinstance(value, str) else text[start:end]


def _skip_closing(text: str, pos: int, closing: str, final: bool) -> int:
    """Skip whitespace and ``closing`` after a call (also a partial one while streaming)."""
    after = skip_whitespace(text, pos)
    if text.startswith(closing, after):
        return after + len(closing)
    if not final and after < len(text) and closing.startswith(text[after:]):
        return len(text)
    return pos


def _hold_partial(tail: str, marker: str) -> str:
    """``tail`` without a suffix that could be the start of ``marker``."""
    for size in range(min(len(marker) - 1, len(tail)), 0, -1):
        if marker.startswith(tail[-size:]):
            return tail[:-size]
    return tail


def _loads(text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True
