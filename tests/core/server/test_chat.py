"""``/v1/chat/completions``: messages, streaming, logprobs, tools, structured output."""

from __future__ import annotations

import asyncio
import json

import httpx2
import jsonschema
import openai
import pytest

from tests.core.server.conftest import MODEL, ServerProcess, async_client

pytestmark = pytest.mark.slow

USER = [{"role": "user", "content": "Say hello."}]

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]}},
            "required": ["city"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}


def chat(client: openai.OpenAI, messages: list, max_tokens: int = 6, **extra: object) -> object:
    extra.setdefault("temperature", 0)
    return client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=max_tokens, **extra
    )


def test_roles_content_parts_and_usage(client: openai.OpenAI, http: httpx2.Client) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Weather"}, {"type": "text", "text": "in Paris?"}],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "developer", "content": "Answer in one word."},
    ]
    response = chat(
        client, messages, max_completion_tokens=4, max_tokens=50, extra_body={"ignore_eos": True}
    )
    choice = response.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"
    assert response.usage.completion_tokens == 4  # max_completion_tokens wins
    rendered = http.post("/tokenize", json={"messages": messages}).json()
    assert response.usage.prompt_tokens == rendered["count"]


def test_n_seed_stop_and_logprobs(client: openai.OpenAI) -> None:
    sampled = chat(client, USER, n=3, temperature=1.0, seed=11, max_tokens=5)
    assert [c.index for c in sampled.choices] == [0, 1, 2]
    assert 3 <= sampled.usage.completion_tokens <= 15
    assert all(c.message.content for c in sampled.choices)
    again = chat(client, USER, n=3, temperature=1.0, seed=11, max_tokens=5)
    assert [c.message.content for c in again.choices] == [
        c.message.content for c in sampled.choices
    ]

    greedy = chat(client, USER, max_tokens=8)
    text = greedy.choices[0].message.content
    word = text.split()[-1]
    stopped = chat(client, USER, max_tokens=8, stop=word)
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == text[: text.index(word)]

    with_logprobs = chat(client, USER, max_tokens=4, logprobs=True, top_logprobs=3)
    content = with_logprobs.choices[0].logprobs.content
    assert len(content) == 4
    assert "".join(entry.token for entry in content) == with_logprobs.choices[0].message.content
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
        assert entry.logprob == entry.top_logprobs[0].logprob  # greedy picks the top one
        assert bytes(entry.bytes).decode() == entry.token


def test_async_stream_with_usage(server: ServerProcess, client: openai.OpenAI) -> None:
    expected = chat(client, USER, max_tokens=8, logprobs=True)

    async def run() -> list:
        aclient = async_client(server)
        stream = await aclient.chat.completions.create(
            model=MODEL,
            messages=USER,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            logprobs=True,
        )
        chunks = [chunk async for chunk in stream]
        await aclient.close()
        return chunks

    chunks = asyncio.run(run())
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.choices[0].message.content
    token_counts = [
        len(c.choices[0].logprobs.content) for c in chunks if c.choices and c.choices[0].logprobs
    ]
    assert sum(token_counts) == 8
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage == expected.usage


def _check_call(call: object, name: str) -> dict:
    assert call.type == "function" and call.id and call.function.name == name
    arguments = json.loads(call.function.arguments)
    schema = {WEATHER["function"]["name"]: WEATHER, TIME["function"]["name"]: TIME}[name]
    jsonschema.validate(arguments, schema["function"]["parameters"])
    return arguments


def test_forced_tool_calls(client: openai.OpenAI) -> None:
    ask = [{"role": "user", "content": "What is the weather in Oslo?"}]
    named = chat(
        client,
        ask,
        max_tokens=80,
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    message = named.choices[0].message
    assert message.tool_calls and len(message.tool_calls) == 1
    _check_call(message.tool_calls[0], "get_weather")
    assert named.choices[0].finish_reason == "tool_calls"

    required = chat(
        client, ask, max_tokens=80, tools=[TIME], tool_choice="required", parallel_tool_calls=False
    )
    calls = required.choices[0].message.tool_calls
    assert calls and all(_check_call(call, "get_time") == {} for call in calls)

    # "none": no tools reach the template, no parsing; "auto" with this model: plain text.
    for choice in ("none", "auto"):
        plain = chat(client, USER, max_tokens=4, tools=[WEATHER], tool_choice=choice)
        assert plain.choices[0].message.tool_calls is None
        assert plain.choices[0].message.content


def test_streamed_tool_call_matches(client: openai.OpenAI) -> None:
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    forced = {"type": "function", "function": {"name": "get_weather"}}
    whole = chat(client, ask, max_tokens=80, tools=[WEATHER], tool_choice=forced)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=ask,
        max_tokens=80,
        temperature=0,
        tools=[WEATHER],
        tool_choice=forced,
        stream=True,
    )
    name, arguments, ids, reasons = "", "", set(), []
    for chunk in stream:
        delta = chunk.choices[0].delta
        reasons.append(chunk.choices[0].finish_reason)
        for fragment in delta.tool_calls or []:
            assert fragment.index == 0
            if fragment.id:
                ids.add(fragment.id)
            name += fragment.function.name or ""
            arguments += fragment.function.arguments or ""
    expected = whole.choices[0].message.tool_calls[0]
    assert len(ids) == 1 and name == expected.function.name
    assert json.loads(arguments) == json.loads(expected.function.arguments)
    assert reasons[-1] == "tool_calls"


def test_response_format(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
        },
        "required": ["name", "age"],
    }
    ask = [{"role": "user", "content": "Describe a person as JSON."}]
    typed = chat(
        client,
        ask,
        max_tokens=60,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": schema},
        },
    )
    assert typed.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(typed.choices[0].message.content), schema)

    anything = chat(client, ask, max_tokens=60, response_format={"type": "json_object"})
    if anything.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(anything.choices[0].message.content), dict)
    else:  # cut by max_tokens: still a JSON object's prefix
        assert anything.choices[0].message.content.lstrip().startswith("{")
