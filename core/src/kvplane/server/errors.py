"""OpenAI-style errors: ``{"error": {"message", "type", "param", "code"}}`` with a status.

Handlers raise :class:`APIError` (or let a ``ValueError`` from parameter validation
escape: it becomes a 400); :func:`install_error_handlers` turns every failure, including
FastAPI's validation errors and unknown routes, into the same body shape.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvplane.engine.async_llm import EngineDeadError

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


class APIError(Exception):
    """An error to answer with ``status`` and an OpenAI-style body."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        error_type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.error_type = error_type or _TYPES.get(status, "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.error_type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def error_body(
    message: str, error_type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def from_exception(error: BaseException) -> APIError:
    """Map a failure to its API error: ValueError 400, a dead engine 503, anything else 500."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, ValueError):
        return APIError(400, str(error))
    if isinstance(error, EngineDeadError):
        return APIError(503, str(error), code="engine_dead")
    logger.error("request failed", exc_info=error)
    return APIError(500, f"internal error: {type(error).__name__}: {error}")


def _validation_error(error: RequestValidationError) -> APIError:
    details = error.errors()
    if not details:
        return APIError(400, "invalid request")
    first = details[0]
    if first.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {first.get('msg')}")
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(location) or None
    message = first.get("msg", "invalid value")
    if param:
        message = f"{param}: {message}"
    if len(details) > 1:
        message += f" (and {len(details) - 1} more errors)"
    return APIError(400, message, param=param)


def install_error_handlers(app: FastAPI) -> None:
    """Answer every failure with an OpenAI-style body."""

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
        return APIError(status, message).response()

    @app.exception_handler(ValueError)
    async def _value(request: Request, error: ValueError) -> JSONResponse:
        return APIError(400, str(error)).response()

    @app.exception_handler(Exception)
    async def _other(request: Request, error: Exception) -> JSONResponse:
        return from_exception(error).response()
