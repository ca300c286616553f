"""What a request's output must match: a JSON schema, any JSON object, a regex or a grammar.

Pure data with no grammar-engine import, so :mod:`kvplane.sampling.params` can carry it.
Validation here is only what needs no tokenizer (exactly one constraint, JSON that parses);
whether the constraint compiles is checked by
:meth:`kvplane.structured.compiler.StructuredOutputCompiler.compile`, which the engine calls
in ``add_request`` before anything is queued.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: The constraint kinds, in the order of the fields.
KINDS: tuple[str, ...] = ("json_schema", "json_object", "regex", "grammar", "structural_tag")


@dataclass(slots=True)
class StructuredOutputParams:
    """Exactly one constraint on the generated text.

    - ``json_schema``: a JSON schema (dict, or its JSON text); the output is one JSON value
      that validates against it. Objects list their properties in the schema's order and
      carry no properties the schema does not name (``additionalProperties`` defaults to
      false, as in OpenAI's strict mode), so the output is a valid instance of the schema.
    - ``json_object``: any JSON object (OpenAI's ``response_format={"type": "json_object"}``).
    - ``regex``: the whole output matches the regular expression (``re.fullmatch``).
    - ``grammar``: an EBNF grammar in xgrammar's dialect (GBNF-like, root rule ``root``).
    - ``structural_tag``: an xgrammar structural tag (dict or JSON text,
      ``{"type": "structural_tag", "format": {...}}``); used for forced tool calls.

    Raises ``ValueError`` when none or several are set, or a JSON text does not parse.
    """

    json_schema: dict[str, Any] | str | None = None
    json_object: bool = False
    regex: str | None = None
    grammar: str | None = None
    structural_tag: dict[str, Any] | str | None = None

    def __post_init__(self) -> None:
        chosen = [kind for kind in KINDS if _is_set(getattr(self, kind))]
        if len(chosen) != 1:
            raise ValueError(
                "structured output needs exactly one of json_schema, json_object, regex, "
                f"grammar, structural_tag; got {chosen or 'none'}"
            )
        for name in ("json_schema", "structural_tag"):
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    parsed = json.loads(value)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{name} is not valid JSON: {e}") from e
                if not isinstance(parsed, dict):
                    raise ValueError(f"{name} must be a JSON object, got {value[:80]!r}")
            elif value is not None and not isinstance(value, dict):
                raise ValueError(f"{name} must be a dict or JSON text, got {type(value).__name__}")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{name} must be a string, got {type(value).__name__}")

    @property
    def kind(self) -> str:
        """The constraint set: one of :data:`KINDS`."""
        return next(kind for kind in KINDS if _is_set(getattr(self, kind)))

    @property
    def key(self) -> tuple[str, str]:
        """``(kind, canonical text)``: equal for equal constraints; the compile cache key."""
        kind = self.kind
        value = getattr(self, kind)
        if kind == "json_object":
            return kind, ""
        if isinstance(value, str) and kind in ("json_schema", "structural_tag"):
            value = json.loads(value)
        if isinstance(value, dict):
            return kind, json.dumps(value, sort_keys=True, separators=(",", ":"))
        return kind, str(value)

    @classmethod
    def from_response_format(
        cls, response_format: Mapping[str, Any] | None
    ) -> StructuredOutputParams | None:
        """Map OpenAI's ``response_format`` to params; ``None`` for ``text`` or no format.

        Accepts ``{"type": "text"}``, ``{"type": "json_object"}``,
        ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}`` and
        vLLM's ``{"type": "structural_tag", "format": {...}}``. Raises ``ValueError`` for
        anything else.
        """
        if response_format is None:
            return None
        kind = response_format.get("type")
        if kind == "text":
            return None
        if kind == "json_object":
            return cls(json_object=True)
        if kind == "json_schema":
            spec = response_format.get("json_schema")
            if not isinstance(spec, Mapping):
                raise ValueError("response_format json_schema needs a 'json_schema' object")
            schema = spec.get("schema", {"type": "object"})
            if not isinstance(schema, (dict, str)):
                raise ValueError("response_format json_schema.schema must be an object")
            return cls(json_schema=schema)
        if kind == "structural_tag":
            return cls(structural_tag=dict(response_format))
        raise ValueError(
            f"response_format type must be text, json_object, json_schema or structural_tag, "
            f"got {kind!r}"
        )


def _is_set(value: object) -> bool:
    return value is not None and value is not False
