"""POST a request and read its server-sent events: asyncio protocol + httptools' C parser.

The benchmark client has to read every event of hundreds of concurrent streams without
setting their pace. An HTTP client written in Python (httpx on h11) costs tens of
microseconds per event in its own layers; with 500 streams of 128 events it kept one core
busy and delayed the events it measured. Here the event loop hands the socket's bytes to
the protocol, httptools removes the chunked framing in C, and each event's ``data:``
payload goes to a callback at once, with no coroutine or task per event.

Each ``data:`` line is one event's payload (lines end in ``\\n`` or ``\\r\\n``; the JSON
events of OpenAI-style streams are one line each). One connection per request
(``Connection: close``), ``http`` or ``https``.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

import httptools


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where to POST: parsed once, used by every request."""

    host: str
    port: int
    path: str
    tls: bool

    @classmethod
    def from_url(cls, url: str) -> Endpoint:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"expected an http:// or https:// URL, got {url!r}")
        tls = parts.scheme == "https"
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        return cls(parts.hostname, parts.port or (443 if tls else 80), path, tls)


@dataclass(frozen=True, slots=True)
class Response:
    """The status and, unless it is 200, the body (the error's text)."""

    status: int
    error_body: bytes


async def post_events(
    endpoint: Endpoint,
    body: bytes,
    on_event: Callable[[bytes], None],
    headers: Mapping[str, str] | None = None,
) -> Response:
    """POST ``body`` (JSON) and call ``on_event`` with each event's ``data:`` payload as
    it arrives (a 200 response only); returns once the response has ended. Raises
    ``ConnectionError`` when the connection ends first, ``ValueError`` on a response
    that is not HTTP."""
    loop = asyncio.get_running_loop()
    context = ssl.create_default_context() if endpoint.tls else None
    transport, protocol = await loop.create_connection(
        lambda: _EventStream(loop, on_event), endpoint.host, endpoint.port, ssl=context
    )
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    head = (
        f"POST {endpoint.path} HTTP/1.1\r\nHost: {endpoint.host}:{endpoint.port}\r\n"
        f"Content-Type: application/json\r\nAccept: text/event-stream\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n{extra}\r\n"
    )
    transport.write(head.encode("latin-1") + body)
    try:
        await protocol.finished
    finally:
        transport.close()
    return Response(protocol.status, bytes(protocol.error_body))


class _EventStream(asyncio.Protocol):
    """One response: parses it as it arrives and hands out its events."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_event: Callable[[bytes], None]):
        self.on_event = on_event
        self.finished: asyncio.Future[None] = loop.create_future()
        self.status = 0
        self.error_body = bytearray()
        self._pending = bytearray()  # body bytes after the last complete event
        self._parser = httptools.HttpResponseParser(self)

    # -- asyncio.Protocol ------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as error:
            self._fail(ValueError(f"not an HTTP response: {error}"))
        except Exception as error:  # raised by on_event: the caller's, ends this response
            self._fail(error)

    def connection_lost(self, error: Exception | None) -> None:
        self._fail(error or ConnectionError("the connection closed before the response ended"))

    # -- httptools callbacks -------------------------------------------------------------

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        if self.status != 200:
            self.error_body += body
            return
        pending = self._pending
        pending += body
        start = 0
        while (end := pending.find(b"\n", start)) >= 0:
            if pending.startswith(b"data:", start):
                self.on_event(bytes(pending[start + 5 : end].strip()))
            start = end + 1
        del pending[:start]

    def on_message_complete(self) -> None:
        if not self.finished.done():
            self.finished.set_result(None)

    def _fail(self, error: BaseException) -> None:
        if not self.finished.done():
            self.finished.set_exception(error)
