"""OpenAI-style errors: ``{"error": {"message", "type", "param", "code"}}`` with a status.

Handlers raise :class:`APIError` (or let a ``ValueError`` from parameter validation
escape: it becomes a 400); :func:`install_error_handlers` turns every failure, including
FastAPI's validation errors (400, as OpenAI answers, not FastAPI's 422), unknown routes
and unexpected exceptions, into the same body shape.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from kvplane.engine.async_llm import EngineDeadError, RequestFailedError

logger = logging.getLogger(__name__)

# The ``type`` field by status, as OpenAI's API spells it.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    500: "server_error",
    503: "server_error",
}

#: Codes of 503s that pass (a full queue, a server going away for another to take over):
#: their answers say when to retry (the openai SDK honours ``Retry-After``).
RETRY_LATER_CODES = frozenset({"server_overloaded", "shutting_down"})
RETRY_AFTER_SECONDS = 1

#: Scope key :class:`AnswerUnhandledErrors` sets to the exception it answered, so that
#: :class:`~kvplane.server.middleware.HttpMetrics` counts the request as one.
UNHANDLED_EXCEPTION = "kvplane.unhandled_exception"


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error's body (for the OpenAPI schema; :func:`error_body` builds it)."""

    error: ErrorDetail


class APIError(Exception):
    """An error to answer with ``status`` and an OpenAI-style body."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        error_type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.error_type = error_type or _TYPES.get(status, "invalid_request_error")
        self.headers = dict(headers or {})
        if code in RETRY_LATER_CODES:
            self.headers.setdefault("Retry-After", str(RETRY_AFTER_SECONDS))

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.error_type, self.param, self.code)

    def response(self) -> JSONResponse:
        return _ErrorJSONResponse(self.body(), status_code=self.status, headers=self.headers)


class _ErrorJSONResponse(JSONResponse):
    """JSON escaped to ASCII, so that a message quoting text that is not Unicode (a lone
    surrogate) still encodes: the error answer itself must never fail."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, allow_nan=False, separators=(",", ":")).encode()


def error_body(
    message: str, error_type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def from_exception(error: BaseException) -> APIError:
    """Map a failure to its API error: ValueError 400, a dead engine 503, a request the
    engine failed on 500 ``request_failed`` (already logged by the engine), anything else
    500."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, ValueError):
        return APIError(400, str(error))
    if isinstance(error, EngineDeadError):
        return APIError(503, str(error), code="engine_dead")
    if isinstance(error, RequestFailedError):
        return APIError(500, str(error), code="request_failed")
    logger.error("request failed", exc_info=error)
    return APIError(500, f"internal error: {type(error).__name__}: {error}")


# A union's member in a validation error's location ("str", "list[constrained-int]",
# "function-after[...]", a model's name): not a field, so not part of ``param``.
_FIELD_NAME = re.compile(r"[a-z_][a-z0-9_]*")
_TYPE_NAMES = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})
#: Validation errors for a string that is not Unicode (pydantic's own, and protocol's).
_NOT_UNICODE = frozenset({"string_unicode", "invalid_unicode"})


def _param_of(location: tuple[int | str, ...]) -> str | None:
    """``messages.0.content`` from ``("body", "messages", 0, "content", "str")``."""
    parts = [
        str(part)
        for part in location
        if isinstance(part, int) or (_FIELD_NAME.fullmatch(part) and part not in _TYPE_NAMES)
    ]
    if parts and parts[0] == "body":
        parts = parts[1:]
    return ".".join(parts) or None


def _validation_error(error: RequestValidationError) -> APIError:
    details = error.errors()
    if not details:
        return APIError(400, "invalid request")
    # Text that is not Unicode is the cause whichever member of a union reports it;
    # otherwise the deepest error names the field most precisely, and of a union's
    # members, one of the value's own type ("too short", not "should be a string").
    likeliest = max(
        details,
        key=lambda d: (len(d.get("loc", ())), not str(d.get("type", "")).endswith("_type")),
    )
    chosen = next((d for d in details if d.get("type") in _NOT_UNICODE), likeliest)
    if chosen.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {chosen.get('msg')}")
    param = _param_of(tuple(chosen.get("loc", ())))
    message = chosen.get("msg", "invalid value")
    if chosen.get("type") == "string_unicode":  # pydantic's words for a lone surrogate
        message = "a lone UTF-16 surrogate is not Unicode text"
    if param:
        message = f"{param}: {message}"
    if len(details) > 1:
        message += f" (and {len(details) - 1} more errors)"
    return APIError(400, message, param=param)


def install_error_handlers(app: FastAPI) -> None:
    """Answer every failure with an OpenAI-style body; call before adding the app's other
    middleware (:class:`AnswerUnhandledErrors` must be inside them)."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        return _validation_error(error).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException) -> JSONResponse:
        status = error.status_code
        message = str(error.detail) if error.detail else HTTPStatus(status).phrase
        headers = dict(error.headers or {})
        if status == 405:
            headers["Allow"] = ", ".join(_allowed_methods(request))
        return APIError(status, message, headers=headers).response()

    @app.exception_handler(ValueError)
    async def _value(request: Request, error: ValueError) -> JSONResponse:
        return APIError(400, str(error)).response()

    app.add_middleware(AnswerUnhandledErrors)


def _allowed_methods(request: Request) -> list[str]:
    """A 405's ``Allow`` (RFC 9110): the methods of every route for the path. Starlette
    names those of the first route only, and a path may have one route per method."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)
        if match is Match.PARTIAL:
            methods |= getattr(route, "methods", None) or set()
    return sorted(methods)


ASGIApp = Callable[..., Any]


class AnswerUnhandledErrors:
    """Answers an exception that escapes the app with its error (500, or 503 for a
    stopped engine: :func:`from_exception`) and returns, so the connection stays usable.

    Why not an ``Exception`` handler: Starlette runs that one in its outermost
    ``ServerErrorMiddleware``, which re-raises after answering; uvicorn then drops the
    keep-alive connection without ``Connection: close``, and the client's next pooled
    request fails with a reset. An exception after the response has started is re-raised:
    that response is broken, and closing the connection is all that is left.

    Marks the scope (:data:`UNHANDLED_EXCEPTION`) for the metrics middleware outside.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_noting_start(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_noting_start)
        except Exception as error:
            if started:
                raise
            scope[UNHANDLED_EXCEPTION] = error
            await from_exception(error).response()(scope, receive, send)
