"""One request's outputs on their way from the engine's thread to its stream.

The engine client's thread puts a whole step's outputs onto the event loop with one
``call_soon_threadsafe`` (:func:`put_all`), and each request's :class:`OutputSink` keeps
what its stream has not taken yet. Outputs waiting there are merged: a newer cumulative
(or final) output replaces the older one, delta outputs add up. A stream that falls
behind the engine (a slow client, a busy event loop) then catches up with one larger
output instead of a backlog of small ones, and the engine never waits for it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

from kvplane.engine.outputs import RequestOutput, accumulate
from kvplane.sampling.params import RequestOutputKind


class OutputSink:
    """The outputs (or the error that ends it) a request's stream has not taken yet.

    :meth:`put` runs on ``loop`` (the stream's event loop), :meth:`get` awaits there.
    """

    __slots__ = ("_pending", "_ready", "kind", "loop", "request_id")

    def __init__(
        self, request_id: str, loop: asyncio.AbstractEventLoop, kind: RequestOutputKind
    ) -> None:
        self.request_id = request_id
        self.loop = loop
        self.kind = kind
        self._pending: deque[RequestOutput | BaseException] = deque()
        self._ready = asyncio.Event()

    def put(self, item: RequestOutput | BaseException) -> None:
        """Queue ``item``, merged into the output still waiting if both are outputs."""
        pending = self._pending
        if pending and isinstance(item, RequestOutput):
            waiting = pending[-1]
            if isinstance(waiting, RequestOutput):
                delta = self.kind == RequestOutputKind.DELTA
                pending[-1] = accumulate(waiting, item) if delta else item
                return
        pending.append(item)
        self._ready.set()

    async def get(self) -> RequestOutput | BaseException:
        """The next output or error, once there is one."""
        while not self._pending:
            self._ready.clear()
            await self._ready.wait()
        return self._pending.popleft()


def put_all(deliveries: list[tuple[OutputSink, Any]]) -> None:
    """Put each ``(sink, item)`` (on the sinks' event loop)."""
    for sink, item in deliveries:
        sink.put(item)
