"""A queue of requests kept sorted by a scheduling key."""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator

from kvplane.scheduler.request import Request

# Compared element by element; the last element is a unique sequence number, so two
# entries never compare their requests.
SortKey = tuple[float, ...]


class RequestQueue:
    """Requests in ascending key order; the first is served first.

    Insert O(log n) search + O(n) move, remove O(n); fine for the few thousand requests
    a scheduler holds.
    """

    def __init__(self) -> None:
        self._entries: list[tuple[SortKey, Request]] = []

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[Request]:
        return (request for _, request in self._entries)

    def insert(self, key: SortKey, request: Request) -> None:
        bisect.insort(self._entries, (key, request))

    def remove(self, request: Request) -> bool:
        """Remove ``request`` (by identity); False if it is not queued."""
        for i, (_, queued) in enumerate(self._entries):
            if queued is request:
                del self._entries[i]
                return True
        return False

    def first(self, predicate: Callable[[Request], bool] | None = None) -> Request | None:
        """The first request (that ``predicate`` accepts, where given), or None."""
        if predicate is None:
            return self._entries[0][1] if self._entries else None
        return next((request for _, request in self._entries if predicate(request)), None)

    def last(self) -> Request | None:
        return self._entries[-1][1] if self._entries else None

    def pop_first(self) -> Request:
        return self._entries.pop(0)[1]

    def snapshot(self) -> list[Request]:
        """The requests in order, as a list that later changes to the queue leave alone."""
        return [request for _, request in self._entries]
