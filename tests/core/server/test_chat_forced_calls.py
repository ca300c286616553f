"""``tool_choice`` "required" with parallel calls, and calls cut off by ``max_tokens``.

Driven by the official openai client against the real server (the embedded SmolLM2, whose
template shows it no tools: it writes calls only because the grammar makes it).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import jsonschema
import openai
import pytest

from tests.core.server.conftest import MODEL, ServerProcess, async_client
from tests.core.server.test_chat import TIME, WEATHER

pytestmark = pytest.mark.slow

OSLO = [{"role": "user", "content": "What is the weather in Oslo?"}]
OSLO_AND_PARIS = [{"role": "user", "content": "What is the weather in Oslo and in Paris?"}]
MAX_TOKENS = 400
#: SmolLM2's token "<": the first token of every <tool_call>.
LESS_THAN_TOKEN_ID = 44


def required(**extra: Any) -> dict[str, Any]:
    """Request arguments: any of the tools, calls in parallel, greedy."""
    arguments: dict[str, Any] = {
        "model": MODEL,
        "tools": [WEATHER, TIME],
        "tool_choice": "required",
        "temperature": 0,
        "max_tokens": MAX_TOKENS,
    }
    return arguments | extra


def check_calls(calls: list[Any]) -> None:
    """Each call names a tool and its arguments validate against that tool's schema."""
    schemas = {tool["function"]["name"]: tool["function"]["parameters"] for tool in (WEATHER, TIME)}
    for call in calls:
        assert call.type == "function" and call.id
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


def test_a_newline_after_a_call_lets_the_output_end(client: openai.OpenAI) -> None:
    # After its first call SmolLM2 writes a newline (p ~0.6; the end is next, p ~0.3). That
    # newline used to commit it to another call, and so on until max_tokens. With "<" (the
    # start of every call) banned, the model takes another call only where the grammar
    # allows nothing else: after the newline it now ends.
    response = client.chat.completions.create(
        messages=OSLO, **required(logit_bias={str(LESS_THAN_TOKEN_ID): -100})
    )
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert choice.message.tool_calls and len(choice.message.tool_calls) == 1
    check_calls(choice.message.tool_calls)
    assert response.usage is not None and response.usage.completion_tokens < 80


def test_parallel_calls_end_well_before_max_tokens(server: ServerProcess) -> None:
    async def run() -> list[Any]:
        aclient = async_client(server)
        requests = [aclient.chat.completions.create(messages=OSLO_AND_PARIS, **required())]
        requests += [
            aclient.chat.completions.create(
                messages=OSLO_AND_PARIS, **required(temperature=0.8, seed=seed)
            )
            for seed in (2, 4)
        ]
        responses = await asyncio.gather(*requests)
        await aclient.close()
        return responses

    for response in asyncio.run(run()):
        choice = response.choices[0]
        assert choice.finish_reason == "tool_calls", choice.message
        assert choice.message.content is None
        assert choice.message.tool_calls and 1 <= len(choice.message.tool_calls) <= 3
        check_calls(choice.message.tool_calls)
        assert response.usage.completion_tokens < MAX_TOKENS // 2


def test_without_parallel_calls_exactly_one(client: openai.OpenAI) -> None:
    # The question asks for two calls (test above); only one may be made.
    response = client.chat.completions.create(
        messages=OSLO_AND_PARIS, **required(parallel_tool_calls=False)
    )
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls and len(choice.message.tool_calls) == 1
    check_calls(choice.message.tool_calls)


async def _streamed(aclient: openai.AsyncOpenAI, max_tokens: int) -> dict[str, Any]:
    """What a client assembles from the stream: content, calls by index, finish_reason."""
    stream = await aclient.chat.completions.create(
        messages=OSLO_AND_PARIS, stream=True, **required(max_tokens=max_tokens)
    )
    content, calls, finish_reason = "", {}, None
    async for chunk in stream:
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        finish_reason = choice.finish_reason or finish_reason
        for fragment in choice.delta.tool_calls or []:
            if fragment.index not in calls:
                assert fragment.id and fragment.function.name
                calls[fragment.index] = [fragment.function.name, ""]
            calls[fragment.index][1] += fragment.function.arguments or ""
    return {
        "content": content or None,
        "calls": [tuple(calls[index]) for index in sorted(calls)],
        "finish_reason": finish_reason,
    }


async def _whole(aclient: openai.AsyncOpenAI, max_tokens: int) -> dict[str, Any]:
    response = await aclient.chat.completions.create(
        messages=OSLO_AND_PARIS, **required(max_tokens=max_tokens)
    )
    choice = response.choices[0]
    calls = choice.message.tool_calls or []
    return {
        "content": choice.message.content,
        "calls": [(call.function.name, call.function.arguments) for call in calls],
        "finish_reason": choice.finish_reason,
    }


#: Cuts (max_tokens) in the first call's name and arguments, at its end, in the second
#: call's opening, after its name (no arguments yet) and in its arguments. Uncut, the output
#: is two calls in about 100 tokens, the first call's arguments starting at token 31, the
#: second's at token 84.
CUTS = (12, 25, 31, 36, 41, 45, 50, 56, 64, 76, 80, 84, 88, 96)


def test_cut_off_calls_read_the_same_streamed_and_whole(server: ServerProcess) -> None:
    async def run() -> list[tuple[dict[str, Any], dict[str, Any]]]:
        aclient = async_client(server)
        whole = [_whole(aclient, max_tokens) for max_tokens in CUTS]
        streamed = [_streamed(aclient, max_tokens) for max_tokens in CUTS]
        results = await asyncio.gather(*whole, *streamed)
        await aclient.close()
        return list(zip(results[: len(CUTS)], results[len(CUTS) :], strict=True))

    num_calls = set()
    for max_tokens, (whole, streamed) in zip(CUTS, asyncio.run(run()), strict=True):
        assert whole == streamed, max_tokens
        assert whole["finish_reason"] == "length"
        assert whole["content"] is None, max_tokens  # no markup as text
        assert all(arguments for _, arguments in whole["calls"]), "a call with no arguments"
        for _, arguments in whole["calls"][:-1]:
            json.loads(arguments)  # every call but the cut-off one is complete
        num_calls.add(len(whole["calls"]))
    assert num_calls == {0, 1, 2}  # the cuts reach into the second call
