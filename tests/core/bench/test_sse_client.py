"""The benchmark's event-stream client against a raw loopback server: framing, errors."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

import pytest

from kvplane.bench.sse_client import Endpoint, post_events

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _read_request(reader: asyncio.StreamReader) -> dict[str, object]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return json.loads(await reader.readexactly(length))


def _chunked(payload: bytes) -> bytes:
    return f"{len(payload):x}\r\n".encode() + payload + b"\r\n"


async def _serve(handler: Handler, body: bytes = b"{}") -> tuple[object, list[bytes]]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    events: list[bytes] = []
    try:
        endpoint = Endpoint.from_url(f"http://127.0.0.1:{port}/v1/completions")
        response = await post_events(endpoint, body, events.append, {"X-Test": "1"})
    finally:
        server.close()
        await server.wait_closed()
    return response, events


@pytest.mark.parametrize("newline", [b"\n", b"\r\n"])
def test_events_split_anywhere_arrive_whole_and_in_order(newline: bytes) -> None:
    """The server sends its chunked body a few bytes at a time, so chunk sizes, events
    and TCP reads all cut each other at odd places; lines end either way."""
    events = [json.dumps({"choices": [{"text": f" t{i}"}]}).encode() for i in range(50)]
    lines = [b"data: " + e for e in events] + [b": a comment", b"data: [DONE]"]
    stream = b"".join(line + newline + newline for line in lines)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await _read_request(reader)
        assert request == {"prompt": [1, 2]}
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for start in range(0, len(stream), 7):
            writer.write(_chunked(stream[start : start + 7]))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        writer.close()

    response, received = asyncio.run(_serve(handler, json.dumps({"prompt": [1, 2]}).encode()))
    assert response.status == 200  # type: ignore[attr-defined]
    assert received == [*events, b"[DONE]"]


def test_an_error_status_returns_its_body_and_no_events() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        body = b'{"error": {"message": "bad model"}}'
        writer.write(b"HTTP/1.1 404 Not Found\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()

    response, received = asyncio.run(_serve(handler))
    assert response.status == 404 and b"bad model" in response.error_body  # type: ignore[attr-defined]
    assert received == []


def test_a_response_cut_short_raises() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        writer.write(_chunked(b"data: {}\n\n"))
        await writer.drain()
        writer.close()  # no final chunk

    with pytest.raises(ConnectionError):
        asyncio.run(_serve(handler))


def test_endpoint_parses_urls_and_rejects_others() -> None:
    assert Endpoint.from_url("https://h.example/v1/completions?x=1") == Endpoint(
        "h.example", 443, "/v1/completions?x=1", True
    )
    assert Endpoint.from_url("http://127.0.0.1:8000").path == "/"
    with pytest.raises(ValueError, match="http"):
        Endpoint.from_url("ftp://host/x")
