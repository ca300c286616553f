"""Sending the fuzzer's requests (``fuzz.py``) and checking every answer."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx2

from tests.core.server.fuzz import FuzzRequest

NUM_SLOWEST = 5


@dataclass(slots=True)
class FuzzReport:
    """What the server answered; ``problems`` lists every broken rule (empty: passed)."""

    num_requests: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    duration_s: float = 0.0
    #: The slowest answers, as (seconds, what was asked).
    slowest: list[tuple[float, str]] = field(default_factory=list)

    def record_time(self, seconds: float, request: FuzzRequest) -> None:
        self.slowest.append(
            (seconds, f"{request.path} [{request.mutation}] {request.body[:200]!r}")
        )
        self.slowest = sorted(self.slowest, reverse=True)[:NUM_SLOWEST]

    @property
    def num_5xx(self) -> int:
        return sum(count for status, count in self.statuses.items() if status >= 500)

    def figures(self) -> dict[str, Any]:
        return {
            "requests": self.num_requests,
            "by_status": {str(status): n for status, n in sorted(self.statuses.items())},
            "5xx": self.num_5xx,
            "problems": len(self.problems),
            "duration_s": round(self.duration_s, 1),
            "slowest_s": [round(seconds, 2) for seconds, _ in self.slowest],
        }


def check_answer(request: FuzzRequest, status: int, content: bytes) -> str | None:
    """The broken rule in one answer, or ``None``: no 5xx, an OpenAI-style error body for
    every other non-2xx, a parseable body (or event stream ending in ``[DONE]``) for 2xx."""
    where = f"{request.path} [{request.mutation}] {status} body={request.body[:300]!r}"
    if status >= 500:
        return f"5xx: {where} answer={content[:300]!r}"
    text = content.decode("utf-8", "replace")
    if status >= 300:
        try:
            error = json.loads(text)["error"]
            assert set(error) == {"message", "type", "param", "code"}, error
            assert isinstance(error["message"], str) and isinstance(error["type"], str)
        except (ValueError, KeyError, TypeError, AssertionError) as exc:
            return f"malformed error ({exc!r}): {where} answer={text[:300]!r}"
        return None
    try:
        if text.startswith("data: "):
            events = [line[6:] for line in text.split("\n") if line.startswith("data: ")]
            assert events[-1] == "[DONE]", events[-1]
            for event in events[:-1]:
                json.loads(event)
        else:
            json.loads(text)
    except (ValueError, AssertionError, IndexError) as exc:
        return f"malformed 2xx ({exc!r}): {where} answer={text[:300]!r}"
    return None


async def run(
    base_url: str, requests: list[FuzzRequest], concurrency: int, timeout_s: float = 60.0
) -> FuzzReport:
    """Send ``requests`` with ``concurrency`` in flight over one keep-alive pool; after
    each answer ``/health`` must be 200. A request unanswered within ``timeout_s`` is a
    problem (every request is meant to be cheap)."""
    report = FuzzReport()
    pending = list(reversed(requests))
    limits = httpx2.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    start = time.monotonic()
    async with httpx2.AsyncClient(base_url=base_url, timeout=timeout_s, limits=limits) as client:

        async def worker() -> None:
            while pending:
                request = pending.pop()
                sent = time.monotonic()
                try:
                    response = await client.post(
                        request.path, content=request.body, headers=request.headers
                    )
                except httpx2.TransportError as exc:  # a hang, or a dropped connection
                    report.num_requests += 1
                    waited = time.monotonic() - sent
                    report.problems.append(
                        f"no answer ({exc!r}) after {waited:.0f} s: {request.path} "
                        f"[{request.mutation}] body={request.body!r}"
                    )
                    continue
                report.record_time(time.monotonic() - sent, request)
                report.num_requests += 1
                report.statuses[response.status_code] += 1
                problem = check_answer(request, response.status_code, response.content)
                if problem is not None:
                    report.problems.append(problem)
                health = await client.get("/health")
                if health.status_code != 200:
                    report.problems.append(f"/health {health.status_code} after {problem}")

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    report.duration_s = time.monotonic() - start
    return report


def fixed_request(model: str) -> dict[str, Any]:
    """The greedy request whose answer must not change across a fuzz run."""
    return {
        "model": model,
        "prompt": "The capital of France is",
        "max_tokens": 8,
        "temperature": 0,
        "logprobs": 1,
    }


def fixed_answer(base_url: str, model: str, api_key: str | None) -> dict[str, Any]:
    """The fixed request's choice: text, tokens, logprobs and finish reason."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    response = httpx2.post(
        base_url + "/v1/completions", json=fixed_request(model), headers=headers, timeout=120
    )
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]
