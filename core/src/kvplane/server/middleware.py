"""The gate every HTTP request passes first: draining, API key, body size.

A plain ASGI middleware (not Starlette's ``BaseHTTPMiddleware``), so the app's
``receive`` still reports ``http.disconnect`` when a client goes away: the handlers rely
on that to abort abandoned requests.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from typing import Any

from kvplane.server.errors import APIError

#: Routes that need no API key (probes and scrapers usually carry none).
PUBLIC_PATHS = frozenset({"/health", "/ping", "/metrics", "/version"})

ASGIApp = Callable[..., Any]


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
            await _send_error(
                send, APIError(503, "the server is shutting down", code="shutting_down")
            )
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
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
