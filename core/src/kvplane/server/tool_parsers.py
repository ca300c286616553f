"""Tool calls in the model's own format: parse them from the output, stream them, force them.

A chat template decides how a model writes a tool call; :func:`get_tool_parser` picks the
parser from the template:

- ``hermes``: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (Qwen2/2.5/3,
  Hermes, SmolLM3; the default, also for templates without tool support, e.g. SmolLM2);
- ``llama3_json``: ``{"name": ..., "parameters": {...}}`` (Llama 3.1-3.3), ``;``-separated;
- ``mistral``: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`` or the newer
  ``[TOOL_CALLS]name[ARGS]{...}``. ``[TOOL_CALLS]`` is a special token: requests using this
  parser must be decoded with ``skip_special_tokens=False`` (see
  :attr:`ToolParser.skip_special_tokens`).

A parser instance holds streaming state: use one per request. ``arguments`` is the JSON
text exactly as the model wrote it, so the streamed fragments concatenate to the
non-streamed ``arguments``.
"""

from __future__ import annotations

import json
import secrets
import string
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from kvplane.structured.params import StructuredOutputParams
from kvplane.structured.tool_call_formats import (
    ParsedCall,
    ParsedOutput,
    parse_hermes,
    parse_llama3_json,
    parse_mistral,
)

#: Longest whitespace run inside forced tool-call arguments (stops newline loops).
_MAX_WHITESPACE = 16


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One complete function call; ``arguments`` is JSON text (an object, as OpenAI sends)."""

    id: str
    name: str
    arguments: str
    type: str = "function"


@dataclass(frozen=True, slots=True)
class ToolCallFragment:
    """A piece of the ``index``-th call, as in OpenAI's ``delta.tool_calls[i]``.

    The first fragment of a call carries ``id``, ``name`` and ``arguments``, the JSON text
    so far (sent once it has begun, so never ``""``); later ones only ``arguments``, the
    next piece of it.
    """

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str | None = None


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """What one streaming step adds: content text, call fragments, or both."""

    content: str | None = None
    tool_calls: list[ToolCallFragment] = field(default_factory=list)


class ToolParser:
    """Extracts tool calls from text in one model family's format.

    Subclasses set :attr:`name`, implement :meth:`_parse` and the pieces of a forced call
    (:attr:`_call_begin`, :attr:`_call_end`, :attr:`_separator`, :attr:`_prefix`,
    :attr:`_suffix`).
    """

    name: ClassVar[str]
    #: Whether the text given to this parser may be decoded skipping special tokens.
    skip_special_tokens: ClassVar[bool] = True
    #: Forced-call format: ``begin`` (with ``{name}`` as JSON), the arguments, ``end``.
    _call_begin: ClassVar[str]
    _call_end: ClassVar[str]
    _separator: ClassVar[str]
    _prefix: ClassVar[str] = ""
    _suffix: ClassVar[str] = ""

    def __init__(self) -> None:
        self._ids: list[str] = []  # streaming: the id of each call index already announced
        self._last: tuple[str, bool, ParsedOutput] | None = None

    # -- whole text ----------------------------------------------------------------------

    def extract_tool_calls(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """``(content or None, calls)`` from a finished output, as streaming reports it.

        A call cut off by the end of the output (``max_tokens``) is a call with the
        arguments written so far once they have begun, and is left out (its text too)
        before that. A call with malformed JSON stays in the content as text. Content next
        to a call is stripped of the whitespace that separates it from the call.
        """
        parsed = self._parse(text, final=True)
        pieces: list[str | ParsedCall] = []
        for piece in parsed.pieces:
            if isinstance(piece, ParsedCall) and piece.is_malformed:
                piece = piece.raw
            elif isinstance(piece, ParsedCall) and not _is_announced(piece):
                continue
            if isinstance(piece, str) and pieces and isinstance(pieces[-1], str):
                pieces[-1] += piece
            else:
                pieces.append(piece)
        calls = [
            ToolCall(self._new_id(), piece.name or "", piece.arguments)
            for piece in pieces
            if isinstance(piece, ParsedCall)
        ]
        content = _content(pieces, hold_trailing=False)
        return (content or None), calls

    # -- streaming -----------------------------------------------------------------------

    def extract_tool_calls_streaming(
        self, previous_text: str, current_text: str, delta_text: str
    ) -> ToolCallDelta | None:
        """What to send for ``delta_text`` (``current_text = previous_text + delta_text``).

        ``None`` when nothing can be sent yet: text that may turn out to be a call (a partial
        ``<tool_call>``, whitespace before a possible call) is held back until it is decided.
        Call :meth:`finish_streaming` after the last delta to release held-back content.
        """
        return self._diff(self._view(previous_text, False), self._view(current_text, False))

    def finish_streaming(self, current_text: str) -> ToolCallDelta | None:
        """The held-back remainder once ``current_text`` is final (trailing text, if any)."""
        return self._diff(self._view(current_text, False), self._view(current_text, True))

    def _view(self, text: str, final: bool) -> ParsedOutput:
        # Each step's current text is the next step's previous text: parse it once.
        if self._last is not None and self._last[1] == final and self._last[0] == text:
            return self._last[2]
        parsed = self._parse(text, final)
        self._last = (text, final, parsed)
        return parsed

    def _diff(self, before: ParsedOutput, after: ParsedOutput) -> ToolCallDelta | None:
        old_content = _content(before.pieces, hold_trailing=not before.is_final)
        new_content = _content(after.pieces, hold_trailing=not after.is_final)
        content = new_content[len(old_content) :] if new_content.startswith(old_content) else ""
        old_calls = before.calls
        fragments: list[ToolCallFragment] = []
        for index, call in enumerate(after.calls):
            if not _is_announced(call):
                continue
            old = old_calls[index] if index < len(old_calls) else None
            if old is None or not _is_announced(old):
                while len(self._ids) <= index:
                    self._ids.append(self._new_id())
                fragments.append(
                    ToolCallFragment(index, self._ids[index], call.name, call.arguments)
                )
            elif len(call.arguments) > len(old.arguments):
                fragments.append(
                    ToolCallFragment(index, arguments=call.arguments[len(old.arguments) :])
                )
        if not content and not fragments:
            return None
        return ToolCallDelta(content or None, fragments)

    # -- forcing a call ------------------------------------------------------------------

    def tool_choice_constraint(
        self,
        tools: Sequence[Mapping[str, Any]] | None,
        tool_choice: str | Mapping[str, Any] | None,
        parallel_tool_calls: bool = True,
    ) -> StructuredOutputParams | None:
        """The constraint that makes the model call a tool, in this parser's format.

        ``"required"``: one or more calls (only one without ``parallel_tool_calls``) to any
        of ``tools``; a named function (``{"type": "function", "function": {"name": ...}}``):
        exactly one call to it. Arguments follow the function's ``parameters`` schema.
        ``"auto"``, ``"none"`` and ``None``: no constraint. Raises ``ValueError`` for
        malformed tools, an unknown tool_choice or a function not in ``tools``.
        """
        functions = _functions(tools)
        names = _chosen_names(tool_choice, functions)
        if names is None:
            return None
        tags = [
            {
                "type": "tag",
                "begin": self._call_begin.format(name=json.dumps(name)),
                "content": {
                    "type": "json_schema",
                    "json_schema": functions[name],
                    "max_whitespace_cnt": _MAX_WHITESPACE,
                },
                "end": self._call_end,
            }
            for name in names
        ]
        body: dict[str, Any] = tags[0] if len(tags) == 1 else {"type": "or", "elements": tags}
        if tool_choice == "required" and parallel_tool_calls:
            body = self._one_or_more(body)
        if self._prefix or self._suffix:
            body = {
                "type": "sequence",
                "elements": [
                    {"type": "const_string", "value": self._prefix},
                    body,
                    {"type": "const_string", "value": self._suffix},
                ],
            }
        return StructuredOutputParams(structural_tag={"type": "structural_tag", "format": body})

    def _one_or_more(self, call: dict[str, Any]) -> dict[str, Any]:
        """``call``, then any number of ``separator call``; the output may end after any call.

        A separator that is only whitespace (hermes' newline) may also end the output:
        models write a newline after a call about as readily as the end-of-text token, and
        while that newline committed them to another call, writing it meant writing calls
        until ``max_tokens``. Only the next call's opening commits the model to that call.
        """
        separator = {"type": "const_string", "value": self._separator}
        elements: list[dict[str, Any]] = [
            call,
            {"type": "star", "content": {"type": "sequence", "elements": [separator, call]}},
        ]
        if self._separator.isspace():
            elements.append({"type": "optional", "content": separator})
        return {"type": "sequence", "elements": elements}

    # -- for subclasses ------------------------------------------------------------------

    def _parse(self, text: str, final: bool) -> ParsedOutput:
        raise NotImplementedError

    def _new_id(self) -> str:
        return f"call_{uuid.uuid4().hex[:24]}"


class HermesToolParser(ToolParser):
    name = "hermes"
    _call_begin = '<tool_call>\n{{"name": {name}, "arguments": '
    _call_end = "}\n</tool_call>"
    _separator = "\n"

    def _parse(self, text: str, final: bool) -> ParsedOutput:
        return parse_hermes(text, final)


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"
    _call_begin = '{{"name": {name}, "parameters": '
    _call_end = "}"
    _separator = "; "

    def _parse(self, text: str, final: bool) -> ParsedOutput:
        return parse_llama3_json(text, final)


class MistralToolParser(ToolParser):
    name = "mistral"
    skip_special_tokens = False
    _call_begin = '{{"name": {name}, "arguments": '
    _call_end = "}"
    _separator = ", "
    _prefix = "[TOOL_CALLS]["
    _suffix = "]"

    def _parse(self, text: str, final: bool) -> ParsedOutput:
        return parse_mistral(text, final)

    def _new_id(self) -> str:
        # Mistral's templates require ids of exactly 9 letters and digits.
        alphabet = string.ascii_letters + string.digits
        return "".join(secrets.choice(alphabet) for _ in range(9))


#: Parser classes by name (a server's ``--tool-call-parser``).
TOOL_PARSERS: dict[str, type[ToolParser]] = {
    cls.name: cls for cls in (HermesToolParser, Llama3JsonToolParser, MistralToolParser)
}


def detect_tool_parser_name(chat_template: str | Mapping[str, str] | None) -> str:
    """The parser name for a chat template; ``hermes`` when the template shows no format."""
    if isinstance(chat_template, Mapping):
        chat_template = "\n".join(str(t) for t in chat_template.values())
    template = chat_template or ""
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "<tool_call>" in template:
        return "hermes"
    if "<|python_tag|>" in template or ("ipython" in template and "parameters" in template):
        return "llama3_json"
    return "hermes"


def get_tool_parser(tokenizer: Any, name: str | None = None) -> ToolParser:
    """A new parser (one per request) for ``tokenizer``'s chat template, or by ``name``."""
    if name is None:
        name = detect_tool_parser_name(getattr(tokenizer, "chat_template", None))
    if name not in TOOL_PARSERS:
        raise ValueError(f"unknown tool parser {name!r}; choose from {sorted(TOOL_PARSERS)}")
    return TOOL_PARSERS[name]()


def tool_choice_constraint(
    tools: Sequence[Mapping[str, Any]] | None,
    tool_choice: str | Mapping[str, Any] | None,
    parser: ToolParser | None = None,
    parallel_tool_calls: bool = True,
) -> StructuredOutputParams | None:
    """:meth:`ToolParser.tool_choice_constraint` of ``parser`` (default: hermes)."""
    parser = parser or HermesToolParser()
    return parser.tool_choice_constraint(tools, tool_choice, parallel_tool_calls)


def _is_announced(call: ParsedCall) -> bool:
    """Whether ``call`` is reported yet: once its name and the start of its arguments are.

    Waiting for the arguments keeps a call cut off right after its name from reaching the
    client as a call with empty arguments (which clients read as ``{}``).
    """
    return call.name is not None and bool(call.arguments)


def _content(pieces: Sequence[str | ParsedCall], hold_trailing: bool) -> str:
    """Join the text pieces, stripping whitespace that touches a call (or may, when held)."""
    parts: list[str] = []
    for index, piece in enumerate(pieces):
        if not isinstance(piece, str):
            continue
        if index > 0:
            piece = piece.lstrip()
        if index + 1 < len(pieces) or hold_trailing:
            piece = piece.rstrip()
        parts.append(piece)
    return "".join(parts)


def _functions(tools: Sequence[Mapping[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """``{name: parameters schema}`` of OpenAI ``tools``; ``ValueError`` when malformed."""
    functions: dict[str, dict[str, Any]] = {}
    for tool in tools or []:
        if not isinstance(tool, Mapping) or tool.get("type", "function") != "function":
            raise ValueError(f"tools must be {{'type': 'function', 'function': ...}}, got {tool}")
        function = tool.get("function")
        name = function.get("name") if isinstance(function, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(name, str) or not name:
            raise ValueError(f"every tool needs function.name, got {tool}")
        parameters = function.get("parameters")
        if parameters is None:
            parameters = {"type": "object", "properties": {}}
        if not isinstance(parameters, Mapping):
            raise ValueError(f"function {name!r}: parameters must be a JSON schema object")
        functions[name] = dict(parameters)
    return functions


def _chosen_names(
    tool_choice: str | Mapping[str, Any] | None, functions: Mapping[str, Any]
) -> list[str] | None:
    if tool_choice is None or tool_choice in ("auto", "none"):
        return None
    if tool_choice == "required":
        if not functions:
            raise ValueError('tool_choice "required" needs at least one tool in tools')
        return list(functions)
    if isinstance(tool_choice, Mapping):
        function = tool_choice.get("function")
        name = function.get("name") if isinstance(function, Mapping) else None
        if tool_choice.get("type", "function") == "function" and isinstance(name, str):
            if name not in functions:
                raise ValueError(f"tool_choice names function {name!r}, which is not in tools")
            return [name]
    raise ValueError(
        'tool_choice must be "none", "auto", "required" or '
        f'{{"type": "function", "function": {{"name": ...}}}}, got {tool_choice!r}'
    )
