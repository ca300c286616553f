"""Start the engine and serve it with uvicorn; SIGTERM drains, then exits 0.

On SIGTERM or SIGINT the server stops accepting connections (uvicorn closes its
sockets), answers 503 to requests still arriving on open connections, and gives the
requests in flight ``shutdown_timeout`` seconds to finish; those still running then end
with ``finish_reason="abort"`` (their responses complete normally). The engine thread is
stopped last.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import signal
import socket
import threading
from collections.abc import Iterator
from types import FrameType

import uvicorn

from kvplane.engine.async_llm import AsyncLLM
from kvplane.server.app import build_app
from kvplane.server.settings import ServerOptions
from kvplane.server.state import ServerState

logger = logging.getLogger(__name__)

# Beyond the grace period, how long uvicorn waits for responses to end before cancelling.
_UVICORN_EXTRA_SECONDS = 5.0


class _DrainingServer(uvicorn.Server):
    """uvicorn's server with kvplane's shutdown: drain, abort after the grace period, and
    return (exit 0) instead of re-raising the signal as uvicorn does."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list | None = None) -> None:  # type: ignore[type-arg]
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        signals = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in signals}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        first = not self.should_exit
        super().handle_exit(sig, frame)
        if first and self._loop is not None:
            grace = self.state.settings.shutdown_timeout
            self._loop.call_soon_threadsafe(self.state.begin_drain, grace)


def run_server(settings: ServerOptions) -> int:
    """Load the model, serve until SIGTERM / SIGINT, return the exit status (0)."""
    check_port_free(settings.host, settings.port)  # before a model load of many seconds
    engine = AsyncLLM.from_config(settings.engine_config())
    try:
        state = ServerState.create(engine, settings)
        app = build_app(state)
        config = uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            log_level=settings.uvicorn_log_level.lower(),
            access_log=settings.access_log,
            timeout_graceful_shutdown=int(settings.shutdown_timeout + _UVICORN_EXTRA_SECONDS),
            lifespan="off",
        )
        logger.info("serving %s on http://%s:%d", state.model_names, settings.host, settings.port)
        _DrainingServer(config, state).run()
    finally:
        engine.shutdown()
    return 0


def check_port_free(host: str, port: int) -> None:
    """Raise ``ValueError`` when ``host:port`` cannot be bound (in use, or not an address
    of this machine), binding as uvicorn does (``SO_REUSEADDR``) and releasing at once."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise ValueError(f"cannot serve on host {host!r}: {error.strerror}") from None
    family, kind, proto, _, address = addresses[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            hint = "; pass another --port" if error.errno == errno.EADDRINUSE else ""
            raise ValueError(f"cannot serve on {host}:{port}: {error.strerror}{hint}") from None
