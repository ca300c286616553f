"""What every HTTP request passes first: its metrics, then the gate (draining, API key,
body size).

Plain ASGI middleware (not Starlette's ``BaseHTTPMiddleware``), so the app's ``receive``
still reports ``http.disconnect`` when a client goes away: the handlers rely on that to
abort abandoned requests.
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

from starlette.routing import BaseRoute, Match

from kvplane.server.errors import UNHANDLED_EXCEPTION, APIError
from kvplane.server.metrics import ServerMetrics

#: Routes that need no API key (probes and scrapers usually carry none).
PUBLIC_PATHS = frozenset({"/health", "/ping", "/metrics", "/version"})

#: The ``route`` label of a request that matches no route: one value for every unknown
#: path, so scanners cannot grow the number of series.
UNMATCHED_ROUTE = "unmatched"

#: ``method`` label values; any other method is counted as ``other``, for the same reason.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

ASGIApp = Callable[..., Any]


class HttpMetrics:
    """Records every HTTP request in ``metrics``: method, route template, status, and the
    time from its arrival to the end of its response body (so a stream counts whole).

    Outermost of the app's own middleware, so the gate's refusals are counted too. An
    exception from a handler is answered inside, by
    :class:`~kvplane.server.errors.AnswerUnhandledErrors`, which marks the scope: such a
    request counts as raised, with the status it got. One that escapes the gate itself,
    or cuts a started response short, passes through here to Starlette's
    ``ServerErrorMiddleware`` and counts as raised too, with the status the client got
    (500 when none was sent).
    """

    def __init__(self, app: ASGIApp, metrics: ServerMetrics, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        method = scope["method"] if scope["method"] in HTTP_METHODS else "other"
        route = self._route_template(scope)
        status: int | None = None

        async def send_noting_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        raised = False
        try:
            await self.app(scope, receive, send_noting_status)
        except Exception:
            raised = True
            raise  # ServerErrorMiddleware answers 500 (unless the status line was sent)
        finally:
            raised = raised or UNHANDLED_EXCEPTION in scope
            # No status line: the server answers 500 (an app that returned without one).
            self.metrics.record_http(
                method,
                route,
                500 if status is None else status,
                time.perf_counter() - start,
                raised,
            )

    def _route_template(self, scope: dict[str, Any]) -> str:
        """The template of the route the router will pick (its own matching rules), found
        here rather than read from the scope afterwards so that requests the gate refuses
        are counted under the route they asked for. A route matching the path but not the
        method (405) counts for that route."""
        partial: str | None = None
        for candidate in self.routes:
            match, _ = candidate.matches(scope)
            path = getattr(candidate, "path", None)
            if match is Match.FULL and path is not None:
                return str(path)
            if match is Match.PARTIAL and partial is None and path is not None:
                partial = str(path)
        return UNMATCHED_ROUTE if partial is None else partial


class RequestGate:
    """Refuses requests while draining (503), without the API key (401) or with a body
    over ``max_body_bytes`` (413); passes the rest on with the body already read.

    ``is_draining`` is called per request; ``api_key`` None disables the key check.
    """

    def __init__(
        self,
        app: ASGIApp,
        api_key: str | None,
        max_body_bytes: int,
        is_draining: Callable[[], bool],
    ) -> None:
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.is_draining = is_draining

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.is_draining() and path != "/metrics":
            # Connection: close, so that a client's pooled connection is not used again.
            refusal = APIError(
                503,
                "the server is shutting down",
                code="shutting_down",
                headers={"Connection": "close"},
            )
            await _send_error(send, refusal)
            return
        if self.api_key is not None and path not in PUBLIC_PATHS:
            error = self._check_key(headers)
            if error is not None:
                await _send_error(send, error)
                return
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            await _send_error(send, self._too_large())
            return
        body = await self._read_body(receive)
        if body is None:
            await _send_error(send, self._too_large())
            return
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: blocks until http.disconnect

        await self.app(scope, replay, send)

    def _check_key(self, headers: dict[str, str]) -> APIError | None:
        assert self.api_key is not None
        authorization = headers.get("authorization", "")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return APIError(
                401,
                "missing API key: send 'Authorization: Bearer <key>'",
                code="invalid_api_key",
            )
        if not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            return APIError(401, "incorrect API key", code="invalid_api_key")
        return None

    async def _read_body(self, receive: Any) -> bytes | None:
        """The whole body, or None once it exceeds the limit (chunked uploads)."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(chunks)  # disconnected: the app will see it on receive
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _too_large(self) -> APIError:
        return APIError(
            413,
            f"the request body is larger than the limit of {self.max_body_bytes} bytes",
            code="request_too_large",
        )


async def _send_error(send: Any, error: APIError) -> None:
    payload = json.dumps(error.body()).encode()
    await send(
        {
            "type": "http.response.start",
            "status": error.status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *((k.lower().encode(), v.encode()) for k, v in error.headers.items()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
