"""The mutation fuzzer (``fuzz.py``) against the main test server (the embedded SmolLM2):
2,000 requests, no 5xx, an OpenAI-style error for every refusal, ``/health`` 200 after
every answer, and a fixed greedy request answered the same before and after."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.core.server import fuzz, fuzz_run
from tests.core.server.conftest import API_KEY, MODEL, ServerProcess, wait_for_metrics

pytestmark = pytest.mark.slow

NUM_REQUESTS = 2000
CONCURRENCY = 12
SEED = 20261207


def test_generate_is_deterministic() -> None:
    first = fuzz.generate(SEED, 200, MODEL, API_KEY)
    assert first == fuzz.generate(SEED, 200, MODEL, API_KEY)
    assert first != fuzz.generate(SEED + 1, 200, MODEL, API_KEY)
    assert {request.mutation for request in first} == {m.__name__ for m in fuzz.MUTATIONS}


def test_2000_mutated_requests(server: ServerProcess) -> None:
    before = fuzz_run.fixed_answer(server.url, MODEL, API_KEY)
    requests = fuzz.generate(SEED, NUM_REQUESTS, MODEL, API_KEY)
    start = time.monotonic()
    report = asyncio.run(fuzz_run.run(server.url, requests, CONCURRENCY))
    print(f"\n{report.figures()} in {time.monotonic() - start:.1f} s")  # shown with -s
    assert report.num_requests == NUM_REQUESTS
    assert report.problems == [], "\n".join(report.problems[:20])
    assert report.num_5xx == 0
    assert fuzz_run.fixed_answer(server.url, MODEL, API_KEY) == before
    wait_for_metrics(server.url, num_requests_running=0, kv_cache_usage_perc=0.0)
