"""Many clients at once, clients that leave, and what ``/metrics`` reports meanwhile."""

from __future__ import annotations

import asyncio

import httpx2
import openai
import pytest

from tests.core.server.conftest import (
    API_KEY,
    MODEL,
    ServerProcess,
    async_client,
    metrics,
    wait_for_metrics,
)

pytestmark = pytest.mark.slow


def test_64_concurrent_streaming_chats(server: ServerProcess, http: httpx2.Client) -> None:
    conversations = [[{"role": "user", "content": f"Count to {i}."}] for i in range(64)]
    prompt_tokens = [
        http.post("/tokenize", json={"messages": c}).json()["count"] for c in conversations
    ]

    async def one(client: openai.AsyncOpenAI, messages: list) -> tuple[int, int, int, str]:
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=8,
            temperature=0,
            logprobs=True,
            stream=True,
            stream_options={"include_usage": True},
        )
        num_tokens, text, usage = 0, "", None
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                text += choice.delta.content or ""
                num_tokens += len(choice.logprobs.content) if choice.logprobs else 0
        assert usage is not None
        return usage.prompt_tokens, usage.completion_tokens, num_tokens, text

    async def run() -> list[tuple[int, int, int, str]]:
        client = async_client(server)
        results = await asyncio.gather(*(one(client, c) for c in conversations))
        await client.close()
        return results

    before = metrics(server.url)
    results = asyncio.run(run())
    for expected_prompt, (prompt, completion, streamed, text) in zip(
        prompt_tokens, results, strict=True
    ):
        assert prompt == expected_prompt
        assert 1 <= completion <= 8 and streamed == completion and text
    after = wait_for_metrics(server.url, num_requests_running=0, kv_cache_usage_perc=0.0)
    generated = sum(completion for _, completion, _, _ in results)
    assert (
        after["kvplane:generation_tokens_total"] - before["kvplane:generation_tokens_total"]
        == generated
    )
    assert after["kvplane:prompt_tokens_total"] - before["kvplane:prompt_tokens_total"] == sum(
        prompt_tokens
    )
    # The shared system prompt is found in the prefix cache.
    assert after["kvplane:prefix_cache_hits_total"] > before["kvplane:prefix_cache_hits_total"]
    assert (
        after["kvplane:time_to_first_token_seconds_count"]
        - before["kvplane:time_to_first_token_seconds_count"]
        == 64
    )


def test_32_cut_streams_give_back_their_kv_blocks(server: ServerProcess) -> None:
    async def cut(client: openai.AsyncOpenAI, index: int) -> int:
        stream = await client.completions.create(
            model=MODEL,
            prompt=f"Story number {index}:",
            max_tokens=400,
            temperature=0.8,
            seed=index,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        received = 0
        async for _ in stream:
            received += 1
            if received == 3:
                break
        await stream.close()
        return received

    async def run() -> list[int]:
        client = async_client(server)
        received = await asyncio.gather(*(cut(client, i) for i in range(32)))
        # While they were streaming the cache was in use.
        await client.close()
        return received

    before = metrics(server.url)
    assert asyncio.run(run()) == [3] * 32
    after = wait_for_metrics(
        server.url, num_requests_running=0, num_requests_waiting=0, kv_cache_usage_perc=0.0
    )
    aborted = "kvplane:request_success_total{finished_reason=abort}"
    assert after[aborted] - before[aborted] == 32
    # Each stream was cut early, far from its 400 tokens.
    generated = after["kvplane:generation_tokens_total"] - before["kvplane:generation_tokens_total"]
    assert 32 * 2 <= generated < 32 * 50


def test_non_streaming_client_that_leaves_is_aborted(server: ServerProcess) -> None:
    before = metrics(server.url)
    with pytest.raises(httpx2.ReadTimeout):
        httpx2.post(
            server.url + "/v1/completions",
            json={"model": MODEL, "prompt": "A long story:", "max_tokens": 450, "ignore_eos": True},
            headers={"Authorization": f"Bearer {API_KEY}"},
            timeout=httpx2.Timeout(30, read=0.5),
        )
    after = wait_for_metrics(server.url, num_requests_running=0, kv_cache_usage_perc=0.0)
    aborted = "kvplane:request_success_total{finished_reason=abort}"
    assert after[aborted] - before[aborted] == 1
    generated = after["kvplane:generation_tokens_total"] - before["kvplane:generation_tokens_total"]
    assert generated < 450


def test_metrics_text_format(server: ServerProcess) -> None:
    response = httpx2.get(server.url + "/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = response.text
    for name, kind in [
        ("num_requests_running", "gauge"),
        ("num_requests_waiting", "gauge"),
        ("kv_cache_usage_perc", "gauge"),
        ("prefix_cache_hit_rate", "gauge"),
        ("num_preemptions_total", "counter"),
        ("prompt_tokens_total", "counter"),
        ("generation_tokens_total", "counter"),
        ("time_to_first_token_seconds", "histogram"),
        ("time_per_output_token_seconds", "histogram"),
        ("e2e_request_latency_seconds", "histogram"),
    ]:
        assert f"# TYPE kvplane:{name} {kind}\n" in text
    values = metrics(server.url)
    for histogram in ("time_to_first_token_seconds", "e2e_request_latency_seconds"):
        count = values[f"kvplane:{histogram}_count"]
        assert count > 0 and values[f"kvplane:{histogram}_bucket{{le=+Inf}}"] == count
        assert values[f"kvplane:{histogram}_sum"] > 0
    assert 0.0 < values["kvplane:prefix_cache_hit_rate"] <= 1.0
