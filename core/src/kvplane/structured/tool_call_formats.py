"""Split model output into text and tool calls, for each tool-call format, as text arrives.

The parsers in :mod:`kvplane.server.tool_parsers` build on these functions. Each
``parse_*(text, final)`` returns the pieces of ``text`` in order: plain text and
:class:`ParsedCall`\\ s. With ``final=False`` (streaming) the result for a prefix of a text
is always a prefix of the result for the longer text: a partial marker at the end
(``<tool_ca``) is held back instead of shown as text, a call's ``name`` appears only once its
string is complete, and its ``arguments`` only grow. A call cut off by the end of the text
is kept as an incomplete call; parsing stops at malformed call JSON (``is_malformed``). A
value found malformed is dropped, so malformed ``arguments`` read ``""`` from then on and
the streaming diff sends nothing more for that call.

The call JSON is walked key by key so that ``arguments`` can be the model's own text (the
streamed fragments must concatenate to the final ``arguments``, whitespace and all): the
stdlib decoder finds where each complete key and value ends, and ``partial_json_parser``
tells a value cut off by the end of the text from a malformed one.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import partial_json_parser
from partial_json_parser.core.exceptions import PartialJSON

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
    call's source text, shown as content when the call is malformed.
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
            out.pieces.append(_text_after(text[pos:], HERMES_START, final, bool(out.calls)))
            return out
        out.pieces.append(text[pos:start])
        call, end = _json_call(text, _skip_whitespace(text, start + len(HERMES_START)))
        out.pieces.append(call)
        if end is None or not call.is_complete:
            call.raw = text[start:]
            return out
        pos = _skip_closing(text, end, HERMES_END)


def parse_llama3_json(text: str, final: bool) -> ParsedOutput:
    """``{"name": ..., "parameters": ...}``, ``;``-separated, as the whole output.

    Text that does not start with such an object is plain text. While the first object's
    keys do not yet show whether it is a call, nothing is returned (streaming holds it).
    """
    out = ParsedOutput(is_final=final)
    pos = _skip_whitespace(text, 0)
    if text.startswith(LLAMA_PYTHON_TAG, pos):
        pos = _skip_whitespace(text, pos + len(LLAMA_PYTHON_TAG))
    elif not final and LLAMA_PYTHON_TAG.startswith(text[pos:]):
        return out  # empty or a partial <|python_tag|>: undecided
    is_tagged = pos > 0 and text.startswith(LLAMA_PYTHON_TAG, _skip_whitespace(text, 0))
    while True:
        if pos >= len(text) or text[pos] != "{":
            if not out.pieces and not (is_tagged and pos >= len(text)):
                out.pieces.append(text)
            elif pos < len(text):
                out.pieces.append(text[pos:])
            return out
        scan = _scan_object(text, pos)
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
        pos = _skip_whitespace(text, end)
        if pos < len(text) and text[pos] == ";":
            pos = _skip_whitespace(text, pos + 1)
        elif pos >= len(text):
            return out


def parse_mistral(text: str, final: bool) -> ParsedOutput:
    """``[TOOL_CALLS][{...}, ...]`` or ``[TOOL_CALLS]name[ARGS]{...}``, text before."""
    out = ParsedOutput(is_final=final)
    pos = 0
    while True:
        start = text.find(MISTRAL_START, pos)
        if start < 0:
            out.pieces.append(_text_after(text[pos:], MISTRAL_START, final, bool(out.calls)))
            return out
        out.pieces.append(text[pos:start])
        pos = _skip_whitespace(text, start + len(MISTRAL_START))
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
    pos = _skip_whitespace(text, pos + 1)
    while True:
        call, end = _json_call(text, pos)
        out.pieces.append(call)
        if end is None or not call.is_complete:
            call.raw = text[pos:]
            return None
        pos = _skip_whitespace(text, end)
        if pos >= len(text):
            return None
        if text[pos] == "]":
            return pos + 1
        if text[pos] != ",":
            out.pieces.append(text[pos:])  # not a call list after all: the rest is text
            return None
        pos = _skip_whitespace(text, pos + 1)


def _mistral_named(text: str, pos: int, out: ParsedOutput) -> int | None:
    """One ``name[ARGS]{...}`` call at ``pos``; the position after it or None to stop."""
    args_at = text.find(MISTRAL_ARGS, pos)
    call = ParsedCall(raw=text[pos:])
    out.pieces.append(call)
    if args_at < 0:
        return None
    call.name = text[pos:args_at].strip()
    start = _skip_whitespace(text, args_at + len(MISTRAL_ARGS))
    try:
        end = _value_end(text, start)
    except _MalformedJSON:
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
    scan = _scan_object(text, pos)
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


def _skip_closing(text: str, pos: int, closing: str) -> int:
    """Skip whitespace and ``closing`` after a call, also a partial ``closing`` at the end.

    A partial one is the closing still arriving (streaming) or cut off by ``max_tokens``:
    either way it is markup, never content.
    """
    after = _skip_whitespace(text, pos)
    if text.startswith(closing, after):
        return after + len(closing)
    if after < len(text) and closing.startswith(text[after:]):
        return len(text)
    return pos


def _text_after(tail: str, marker: str, final: bool, is_after_call: bool) -> str:
    """The text of ``tail``, the output's rest, which holds no whole ``marker``.

    While streaming, a suffix that may be the start of ``marker`` is held back. In a
    finished output, a rest after a call that is only the start of ``marker`` is the next
    call's opening cut off by ``max_tokens``: markup, so no text.
    """
    if not final:
        return _hold_partial(tail, marker)
    if is_after_call and marker.startswith(tail.strip()):
        return ""
    return tail


def _hold_partial(tail: str, marker: str) -> str:
    """``tail`` without a suffix that could be the start of ``marker``."""
    for size in range(min(len(marker) - 1, len(tail)), 0, -1):
        if marker.startswith(tail[-size:]):
            return tail[:-size]
    return tail


# -- JSON that may still be arriving ------------------------------------------------------

_DECODER = json.JSONDecoder()
_WHITESPACE = re.compile(r"[ \t\n\r]*")
# Characters that may still extend a number the decoder has read: ``1.`` of ``1.5``, ``1e``.
_NUMBER_REST = re.compile(r"[0-9.eE+-]*")


class _MalformedJSON(ValueError):
    """The text cannot be the start of a JSON value (as opposed to merely cut off)."""


@dataclass
class _ObjectScan:
    """The fields of an object that may be cut off, as far as the text goes.

    ``fields`` maps each key seen, in order, to ``(value_start, value_end)`` (``value_end``
    ``None`` while the value is cut off). ``end`` is the position after ``}`` (``None`` while
    cut off). ``is_malformed``: the scan stopped at text that cannot continue the object;
    ``fields`` then holds the fields before it.
    """

    fields: dict[str, tuple[int, int | None]] = field(default_factory=dict)
    end: int | None = None
    is_malformed: bool = False

    @property
    def is_complete(self) -> bool:
        return self.end is not None


def _skip_whitespace(text: str, pos: int) -> int:
    """The first position at or after ``pos`` that is not JSON whitespace."""
    match = _WHITESPACE.match(text, pos)
    assert match is not None  # the pattern matches the empty string
    return match.end()


def _value_end(text: str, pos: int) -> int | None:
    """Position after the JSON value starting at ``pos``; ``None`` while it is cut off.

    Raises :class:`_MalformedJSON` when ``text[pos:]`` cannot start a JSON value.
    """
    if pos >= len(text):
        return None
    try:
        value, end = _DECODER.raw_decode(text, pos)
    except json.JSONDecodeError as error:
        if _is_cut_off(text, pos, error):
            return None
        raise _MalformedJSON(f"no JSON value at {pos}: {text[pos : pos + 20]!r}") from None
    if not isinstance(value, (str, list, dict)):
        rest = _NUMBER_REST.match(text, end)
        assert rest is not None  # the pattern matches the empty string
        if rest.end() == len(text):
            return None  # a number (or literal) touching the end may grow: 12 -> 123
    return end


def _is_cut_off(text: str, pos: int, error: json.JSONDecodeError) -> bool:
    """Whether more text could make a JSON value of ``text[pos:]``, which json rejected."""
    # json stopped at the end of the text, or in a string that runs to the end (it checks
    # the escapes on the way there): what it read is a valid start. Only other stops (a
    # partial number, literal or \uXXXX, or malformed text) need the library, which reads
    # an open string character by character: asked at every delta, it made streaming a
    # 2,000-character argument 2-3x slower (benchmarks/tool_call_stream_bench.py).
    if error.pos == len(text) or error.msg.startswith("Unterminated string"):
        return True
    try:
        partial_json_parser.loads(text[pos:], partial_json_parser.Allow.ALL)
    except PartialJSON:
        return True  # too little to make anything of yet, e.g. "-"
    except (ValueError, AssertionError, IndexError):
        # The library reports malformed text as its own or json's decode error (both
        # ValueErrors) or, from its bracket matching, as AssertionError or IndexError.
        return False
    return True


def _scan_object(text: str, pos: int) -> _ObjectScan:
    """Scan the object whose ``{`` is at ``text[pos]``, key by key."""
    scan = _ObjectScan()
    try:
        _scan_fields(text, pos, scan)
    except _MalformedJSON:
        scan.is_malformed = True
    return scan


def _scan_fields(text: str, pos: int, scan: _ObjectScan) -> None:
    i = _skip_whitespace(text, pos + 1)
    if text.startswith("}", i):
        scan.end = i + 1
        return
    while i < len(text):
        _expect(text, i, '"')
        key_end = _value_end(text, i)
        if key_end is None:
            return
        key = json.loads(text[i:key_end])
        i = _skip_whitespace(text, key_end)
        if i >= len(text):
            return
        _expect(text, i, ":")
        start = _skip_whitespace(text, i + 1)
        if start >= len(text):
            return
        end = _value_end(text, start)
        scan.fields[key] = (start, end)
        if end is None:
            return
        i = _skip_whitespace(text, end)
        if i >= len(text):
            return
        if text[i] == "}":
            scan.end = i + 1
            return
        _expect(text, i, ",")
        i = _skip_whitespace(text, i + 1)


def _expect(text: str, pos: int, char: str) -> None:
    if text[pos] != char:
        raise _MalformedJSON(f"expected {char!r} at {pos}, got {text[pos : pos + 20]!r}")


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
