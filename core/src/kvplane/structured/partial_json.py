"""Scan JSON that may still be arriving: where values start and end, without parsing them.

Used by the tool-call parsers to stream a call's arguments as the model writes them. Every
function takes the text and a position and answers from the characters present; a value
cut off by the end of the text is *incomplete* (``None`` end); malformed input raises
:class:`MalformedJSON`. Scanning is linear in the text scanned.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field


class MalformedJSON(ValueError):
    """The text cannot be the start of a JSON value (as opposed to merely cut off)."""


_WHITESPACE = re.compile(r"[ \t\n\r]*")
# The body of a string up to (not including) its closing quote or the end of the text.
_STRING_BODY = re.compile(r'(?:[^"\\]|\\.)*')
# Numbers, true, false, null: everything up to a delimiter.
_SCALAR = re.compile(r"[^,}\]\s]*")


def skip_whitespace(text: str, pos: int) -> int:
    """The first position at or after ``pos`` that is not JSON whitespace."""
    match = _WHITESPACE.match(text, pos)
    assert match is not None  # the pattern matches the empty string
    return match.end()


def string_end(text: str, pos: int) -> int | None:
    """Position after the string starting at ``text[pos] == '"'``; ``None`` if cut off."""
    match = _STRING_BODY.match(text, pos + 1)
    assert match is not None
    end = match.end()
    return end + 1 if end < len(text) and text[end] == '"' else None


def value_end(text: str, pos: int) -> int | None:
    """Position after the JSON value starting at ``pos``; ``None`` if cut off.

    Brackets are matched (strings respected), contents are not validated: callers that need
    a valid value ``json.loads`` the span.
    """
    if pos >= len(text):
        return None
    first = text[pos]
    if first == '"':
        return string_end(text, pos)
    if first not in "{[":
        match = _SCALAR.match(text, pos)
        assert match is not None
        end = match.end()
        if end == pos:
            raise MalformedJSON(f"no JSON value at {pos}: {text[pos : pos + 20]!r}")
        return None if end == len(text) else end
    depth = 0
    i = pos
    while i < len(text):
        char = text[i]
        if char == '"':
            closing = string_end(text, i)
            if closing is None:
                return None
            i = closing
            continue
        if char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


@dataclass
class ObjectScan:
    """What :func:`scan_object` found in an object that may be cut off.

    ``fields`` maps each key seen, in order, to ``(value_start, value_end)`` (``value_end``
    ``None`` while the value is cut off). ``end`` is the position after ``}`` (``None`` while
    cut off). ``is_malformed``: the scan stopped at text that cannot continue the object;
    ``fields`` then holds what came before it.
    """

    fields: dict[str, tuple[int, int | None]] = field(default_factory=dict)
    end: int | None = None
    is_malformed: bool = False

    @property
    def is_complete(self) -> bool:
        return self.end is not None


def scan_object(text: str, pos: int) -> ObjectScan:
    """Scan the object whose ``{`` is at ``text[pos]``, key by key."""
    scan = ObjectScan()
    try:
        _scan_fields(text, pos, scan)
    except MalformedJSON:
        scan.is_malformed = True
    return scan


def _scan_fields(text: str, pos: int, scan: ObjectScan) -> None:
    i = skip_whitespace(text, pos + 1)
    if i < len(text) and text[i] == "}":
        scan.end = i + 1
        return
    while i < len(text):
        _expect(text, i, '"')
        key_end = string_end(text, i)
        if key_end is None:
            return
        try:
            key = json.loads(text[i:key_end])
        except json.JSONDecodeError as e:
            raise MalformedJSON(str(e)) from e
        i = skip_whitespace(text, key_end)
        if i >= len(text):
            return
        _expect(text, i, ":")
        start = skip_whitespace(text, i + 1)
        if start >= len(text):
            return
        end = value_end(text, start)
        scan.fields[key] = (start, end)
        if end is None:
            return
        i = skip_whitespace(text, end)
        if i >= len(text):
            return
        if text[i] == "}":
            scan.end = i + 1
            return
        _expect(text, i, ",")
        i = skip_whitespace(text, i + 1)


def _expect(text: str, pos: int, char: str) -> None:
    if text[pos] != char:
        raise MalformedJSON(f"expected {char!r} at {pos}, got {text[pos : pos + 20]!r}")
