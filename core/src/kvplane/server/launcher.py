"""Start the engine and serve it with uvicorn; SIGTERM drains, then exits 0.

On SIGTERM or SIGINT the server stops accepting connections (uvicorn closes its
sockets), answers 503 (``shutting_down``, ``Connection: close``) to requests still
arriving on open connections, idle keep-alive ones included, and gives the requests in
flight ``shutdown_timeout`` seconds to finish; those still running then end with
``finish_reason="length"`` (the engine's ``"abort"``; their responses complete normally).
Open connections are closed once no request runs; the engine thread is stopped last.

When the engine cannot go on, every request in flight has already ended with an error
(``AsyncLLM``); the server logs why, shuts down the same way and exits with status 1, so
that a supervisor restarts it rather than leave a process that answers 503.
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
        #: What :func:`run_server` returns: 1 once the engine has died.
        self.exit_status = 0

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

    async def shutdown(self, sockets: list | None = None) -> None:  # type: ignore[type-arg]
        """uvicorn's shutdown, once the requests in flight have finished (or been aborted
        at the end of the grace period). uvicorn closes idle keep-alive connections at
        once: a client's next request on one would meet a reset instead of the 503 the
        gate answers while draining."""
        for server in self.servers:
            server.close()  # no new connections meanwhile, as uvicorn does first
        for sock in sockets or []:
            sock.close()
        if self.state.draining:
            await self._wait_for_runs()
        await super().shutdown(sockets)

    async def _wait_for_runs(self) -> None:
        """Until no engine run is in flight, the grace period and uvicorn's margin at most."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.state.settings.shutdown_timeout + _UVICORN_EXTRA_SECONDS
        while self.state.runs and not self.force_exit and loop.time() < deadline:
            await asyncio.sleep(0.05)

    def engine_died(self, error: BaseException) -> None:
        """Shut down with exit status 1 (called on the engine thread; uvicorn polls
        ``should_exit``)."""
        logger.critical("the engine cannot go on (%r): shutting down with exit status 1", error)
        self.exit_status = 1
        self.should_exit = True


def run_server(settings: ServerOptions) -> int:
    """Load the model, serve until SIGTERM / SIGINT (exit status 0) or until the engine
    cannot go on (1); return the exit status."""
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
        server = _DrainingServer(config, state)
        engine.on_death(server.engine_died)
        server.run()
    finally:
        engine.shutdown()
    return server.exit_status


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
