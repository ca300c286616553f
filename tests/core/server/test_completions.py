"""``/v1/completions`` and the small endpoints, driven by the official openai client."""

from __future__ import annotations

import asyncio

import httpx2
import openai
import pytest

from kvplane.version import __version__
from tests.core.server.conftest import (
    ALIAS,
    MAX_MODEL_LEN,
    MODEL,
    ServerProcess,
    async_client,
)

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"


def greedy(client: openai.OpenAI, prompt: object, max_tokens: int = 6, **extra: object) -> object:
    return client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, **extra
    )


def test_models_and_settings_precedence(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL, ALIAS]
    # KVPLANE_MAX_MODEL_LEN=300 is in the environment; the flag says 512 and wins.
    assert models[0].model_extra["max_model_len"] == MAX_MODEL_LEN
    assert client.models.retrieve(ALIAS).id == ALIAS


def test_health_version_tokenize_detokenize(server: ServerProcess, http: httpx2.Client) -> None:
    health = httpx2.get(server.url + "/health")  # no key needed
    assert health.status_code == 200 and health.headers["content-type"] == "application/json"
    assert health.json()["status"] == "ok" and health.json()["model"] == MODEL
    assert health.json()["uptime_s"] >= 0
    assert httpx2.head(server.url + "/health").status_code == 200
    assert httpx2.head(server.url + "/ping").status_code == 200
    assert http.get("/version").json() == {"version": __version__}
    tokens = http.post("/tokenize", json={"prompt": PROMPT, "return_token_strs": True}).json()
    assert tokens["count"] == len(tokens["tokens"]) == len(tokens["token_strs"]) > 1
    assert tokens["max_model_len"] == MAX_MODEL_LEN
    text = http.post("/detokenize", json={"tokens": tokens["tokens"]}).json()["prompt"]
    assert text == PROMPT
    chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert chat["count"] > tokens["count"]  # the template adds a system prompt and markers


def test_prompt_forms_agree(client: openai.OpenAI, http: httpx2.Client) -> None:
    ids = http.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    as_text = greedy(client, PROMPT)
    as_ids = greedy(client, ids)
    assert as_text.choices[0].text == as_ids.choices[0].text != ""
    assert as_text.usage.prompt_tokens == len(ids)
    assert as_text.usage.completion_tokens == 6
    assert as_text.usage.total_tokens == len(ids) + 6
    assert as_text.choices[0].finish_reason == "length"
    assert as_text.model == MODEL

    batch = greedy(client, [PROMPT, "1, 2, 3,"], max_tokens=3, n=2)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert (
        batch.choices[0].text
        == batch.choices[1].text
        == as_text.choices[0].text[: len(batch.choices[0].text)]
    )
    assert batch.usage.completion_tokens == 12
    id_lists = greedy(client, [ids, ids[:3]], max_tokens=3)
    assert id_lists.choices[0].text == batch.choices[0].text
    assert id_lists.usage.prompt_tokens == len(ids) + 3


def test_sampling_parameters(client: openai.OpenAI, http: httpx2.Client) -> None:
    base = greedy(client, PROMPT)
    text = base.choices[0].text
    # echo puts the prompt first; logprobs: one entry per token, prompt's first is None.
    echoed = greedy(client, PROMPT, echo=True, logprobs=2)
    choice = echoed.choices[0]
    assert choice.text == PROMPT + text
    num_prompt = echoed.usage.prompt_tokens
    assert len(choice.logprobs.tokens) == num_prompt + 6
    assert choice.logprobs.token_logprobs[0] is None
    assert all(lp <= 0 for lp in choice.logprobs.token_logprobs[1:])
    assert all(1 <= len(top) <= 3 for top in choice.logprobs.top_logprobs[1:])
    assert "".join(choice.logprobs.tokens) == choice.text
    assert choice.logprobs.text_offset[num_prompt] == len(PROMPT)

    # stop: the text ends before the stop string, reason "stop".
    word = text.split()[0]
    stopped = greedy(client, PROMPT, stop=[word])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == text[: text.index(word)]

    # logit_bias bans the greedy first token, so the text changes.
    first = greedy(client, PROMPT, max_tokens=1, logprobs=0).choices[0].logprobs.tokens[0]
    (first_id,) = http.post("/tokenize", json={"prompt": first}).json()["tokens"]
    banned = greedy(client, PROMPT, logit_bias={str(first_id): -100}, user="tester")
    assert not banned.choices[0].text.startswith(first)

    # seed: same seed, same sample; penalties and vLLM's extras are accepted and applied.
    sampled = [
        client.completions.create(
            model=MODEL,
            prompt=PROMPT,
            max_tokens=6,
            temperature=1.0,
            top_p=0.9,
            seed=7,
            presence_penalty=0.5,
            frequency_penalty=0.5,
        )
        for _ in range(2)
    ]
    assert sampled[0].choices[0].text == sampled[1].choices[0].text
    extras = client.completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=5,
        temperature=0.8,
        seed=1,
        extra_body={
            "top_k": 5,
            "min_p": 0.05,
            "repetition_penalty": 1.2,
            "ignore_eos": True,
            "min_tokens": 5,
        },
    )
    assert extras.usage.completion_tokens == 5


def test_streaming_matches_non_streaming(client: openai.OpenAI) -> None:
    expected = greedy(client, PROMPT, max_tokens=8, echo=True)
    stream = client.completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=8,
        temperature=0,
        echo=True,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == expected.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage == expected.usage


def test_async_streaming_several_prompts(server: ServerProcess) -> None:
    async def run() -> dict[int, str]:
        client = async_client(server)
        stream = await client.completions.create(
            model=ALIAS,
            prompt=[PROMPT, "Once upon a time"],
            max_tokens=5,
            temperature=0,
            n=2,
            stream=True,
            logprobs=1,
        )
        texts: dict[int, str] = {}
        tokens: dict[int, int] = {}
        async for chunk in stream:
            for choice in chunk.choices:
                texts[choice.index] = texts.get(choice.index, "") + choice.text
                tokens[choice.index] = tokens.get(choice.index, 0) + len(choice.logprobs.tokens)
        await client.close()
        assert tokens == dict.fromkeys(range(4), 5)
        return texts

    texts = asyncio.run(run())
    assert sorted(texts) == [0, 1, 2, 3]
    assert texts[0] == texts[1] and texts[2] == texts[3] and texts[0] != texts[2]


def test_streamed_logprobs_and_usage_match_non_streaming(client: openai.OpenAI) -> None:
    """A stream's chunks carry deltas: their logprobs (echoed prompt included) join into
    the whole response's, with the same text offsets, and the running usage counts up."""
    whole = greedy(client, PROMPT, max_tokens=8, echo=True, logprobs=1)
    stream = client.completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=8,
        temperature=0,
        echo=True,
        logprobs=1,
        stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True},  # type: ignore[typeddict-unknown-key]
    )
    chunks = [chunk for chunk in stream if chunk.choices]
    expected = whole.choices[0].logprobs
    assert expected is not None
    streamed = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs is not None]
    assert [t for lp in streamed for t in lp.tokens or []] == expected.tokens
    assert [o for lp in streamed for o in lp.text_offset or []] == expected.text_offset
    assert [p for lp in streamed for p in lp.token_logprobs or []] == pytest.approx(
        expected.token_logprobs
    )
    completion_tokens = [c.usage.completion_tokens for c in chunks if c.usage is not None]
    assert completion_tokens == sorted(completion_tokens) and completion_tokens[-1] == 8
