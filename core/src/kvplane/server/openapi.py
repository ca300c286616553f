"""The OpenAPI schema the server serves (``/openapi.json``), made to say what it answers.

FastAPI's schema is adjusted in three ways:

- errors: every operation lists the statuses it can answer with OpenAI's error body
  (:class:`~kvplane.server.errors.ErrorResponse`); validation errors are 400, as OpenAI
  answers them, so FastAPI's 422 and its ``HTTPValidationError`` are removed. The routes
  declare their own (:func:`error_responses`); the gate's are added here: 401 when an API
  key is set, 413 where there is a body, 503 while shutting down (``/metrics`` excepted)
  and 500 (a bug) everywhere;
- limits: fields marked with :data:`~kvplane.server.protocol.LIMIT_KEY` get this server's
  bound (vocabulary, ``--max-num-seqs``, ``--max-logprobs``, context length);
- the API key, when set, as a bearer security scheme of the operations that need it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from kvplane.server.errors import ErrorResponse
from kvplane.server.middleware import PUBLIC_PATHS
from kvplane.server.protocol import LIMIT_KEY

_ERROR_DESCRIPTIONS = {
    400: "Invalid request: a field out of range or of the wrong type (`param` names it)",
    401: "Missing or wrong API key (`code: invalid_api_key`)",
    404: "Unknown model (`code: model_not_found`)",
    413: "Body over `--max-request-body-bytes` (`code: request_too_large`)",
    500: "Internal error (a bug), or the engine failed on this request (`request_failed`)",
    503: "Overloaded (`server_overloaded`, with `Retry-After`), shutting down "
    "(`shutting_down`) or the engine has stopped (`engine_dead`)",
}

_SECURITY_SCHEME = "apiKey"

#: The generation routes' 200: a JSON body, or server-sent events with ``stream: true``.
STREAM_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The completion; with `stream: true`, server-sent events",
        # OpenAPI 3.1: an event stream's schema is that of one event.
        "content": {
            "text/event-stream": {
                "schema": {
                    "type": "object",
                    "description": "`data`: a chunk as JSON, or `[DONE]` last",
                    "properties": {"data": {"type": "string"}},
                    "required": ["data"],
                }
            }
        },
    }
}


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """What bounds a request on this server, as the handlers check it."""

    vocab_size: int
    max_model_len: int
    max_num_seqs: int
    max_logprobs: int


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """A route's ``responses=``: the error statuses its handler answers."""
    return {
        status: {"model": ErrorResponse, "description": _ERROR_DESCRIPTIONS[status]}
        for status in statuses
    }


def install_openapi(app: FastAPI, limits: ServerLimits, has_api_key: bool) -> None:
    """Serve the adjusted schema (see the module docstring), built once on first use."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            _replace_validation_errors(schema)
            _add_gate_errors(schema, has_api_key)
            _apply_limits(schema, limits)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _operations(schema: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (path, operation)
        for path, operations in schema.get("paths", {}).items()
        for operation in operations.values()
    ]


def _replace_validation_errors(schema: dict[str, Any]) -> None:
    for _, operation in _operations(schema):
        responses = operation.setdefault("responses", {})
        if responses.pop("422", None) is not None:
            responses.setdefault("400", _error_response(schema, 400))
    schemas = schema.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)


def _add_gate_errors(schema: dict[str, Any], has_api_key: bool) -> None:
    if has_api_key:
        schema.setdefault("components", {}).setdefault("securitySchemes", {})[_SECURITY_SCHEME] = {
            "type": "http",
            "scheme": "bearer",
        }
    for path, operation in _operations(schema):
        statuses = [500]
        if path != "/metrics":
            statuses.append(503)
        if "requestBody" in operation:
            statuses.append(413)
        if has_api_key and path not in PUBLIC_PATHS:
            operation["security"] = [{_SECURITY_SCHEME: []}]
            statuses.append(401)
        responses = operation.setdefault("responses", {})
        for status in statuses:
            responses.setdefault(str(status), _error_response(schema, status))


def _error_response(schema: dict[str, Any], status: int) -> dict[str, Any]:
    schemas = schema.setdefault("components", {}).setdefault("schemas", {})
    if "ErrorResponse" not in schemas:
        body = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(body.pop("$defs", {}))
        schemas["ErrorResponse"] = body
    return {
        "description": _ERROR_DESCRIPTIONS[status],
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
    }


def _apply_limits(node: Any, limits: ServerLimits) -> None:
    """Replace each :data:`LIMIT_KEY` marker under ``node`` by the bound it names."""
    if isinstance(node, list):
        for item in node:
            _apply_limits(item, limits)
        return
    if not isinstance(node, dict):
        return
    name = node.pop(LIMIT_KEY, None)
    if name == "token_id":
        node["maximum"] = limits.vocab_size - 1
    elif name == "token_id_key":  # a dict's propertyNames
        node["pattern"] = f"^({decimal_below(limits.vocab_size)})$"
    elif name == "prompt_ids":
        node["maxItems"] = limits.max_model_len - 1
    elif name == "max_num_seqs":
        node["maximum"] = limits.max_num_seqs
    elif name == "max_logprobs":
        node["maximum"] = limits.max_logprobs
    elif name is not None:
        raise AssertionError(f"unknown limit {name!r}")
    for value in node.values():
        _apply_limits(value, limits)


def decimal_below(bound: int) -> str:
    """A regular expression matching the decimal numbers in ``[0, bound)``, without
    leading zeros (``bound`` at least 1)."""
    top = str(bound - 1)
    if len(top) == 1:
        return f"[0-{top}]"
    # Shorter numbers, then those as long as ``top``: a prefix of its digits, a smaller
    # digit, any digits after; then ``top`` itself.
    alternatives = ["0", f"[1-9][0-9]{{0,{len(top) - 2}}}"]
    for position, digit in enumerate(top):
        lowest = 1 if position == 0 else 0
        if int(digit) > lowest:
            rest = len(top) - position - 1
            tail = f"[0-9]{{{rest}}}" if rest else ""
            alternatives.append(f"{top[:position]}[{lowest}-{int(digit) - 1}]{tail}")
    alternatives.append(top)
    return "|".join(alternatives)
