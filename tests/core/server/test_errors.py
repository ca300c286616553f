"""Every bad input gets its status and an OpenAI-style body; none disturbs the engine."""

from __future__ import annotations

import threading
from typing import Any

import httpx2
import openai
import pytest

from tests.core.server.conftest import (
    API_KEY,
    MAX_BODY_BYTES,
    MAX_MODEL_LEN,
    MAX_NUM_SEQS,
    MODEL,
    ServerProcess,
)

pytestmark = pytest.mark.slow

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "Hi"}]


def _chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": USER, "max_tokens": 2, **fields}


def _completion(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "Hello", "max_tokens": 2, **fields}


# (path, JSON body, expected status, expected param or None)
BAD_REQUESTS = [
    (COMPLETIONS, _completion(max_tokens=-5), 400, "max_tokens"),
    (CHAT, _chat(max_tokens=-1), 400, "max_tokens"),
    (CHAT, _chat(max_completion_tokens=0), 400, "max_completion_tokens"),
    (COMPLETIONS, _completion(temperature=2.5), 400, "temperature"),
    (CHAT, _chat(temperature=-0.1), 400, "temperature"),
    (CHAT, _chat(top_p=0), 400, "top_p"),
    (CHAT, _chat(presence_penalty=3), 400, "presence_penalty"),
    (CHAT, _chat(messages=[{"role": "wizard", "content": "hi"}]), 400, "messages.0.role"),
    (CHAT, _chat(messages=[]), 400, "messages"),
    (
        CHAT,
        _chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]),
        400,
        "messages.0.content.0.type",
    ),
    (COMPLETIONS, _completion(prompt="word " * (MAX_MODEL_LEN + 10)), 400, "prompt"),
    (
        CHAT,
        _chat(messages=[{"role": "user", "content": "word " * MAX_MODEL_LEN}]),
        400,
        "messages",
    ),
    (COMPLETIONS, _completion(prompt=[]), 400, "prompt"),
    (COMPLETIONS, _completion(prompt=[10**9]), 400, None),
    (COMPLETIONS, _completion(n=MAX_NUM_SEQS + 1), 400, "n"),
    (CHAT, _chat(n=0), 400, "n"),
    (COMPLETIONS, _completion(logprobs=21), 400, "logprobs"),
    (CHAT, _chat(logprobs=True, top_logprobs=50), 400, "top_logprobs"),
    (CHAT, _chat(top_logprobs=2), 400, "top_logprobs"),
    (COMPLETIONS, _completion(logit_bias={"99999999": 5}), 400, None),
    (COMPLETIONS, _completion(min_tokens=5, max_tokens=2), 400, "min_tokens"),
    (
        CHAT,
        _chat(
            response_format={
                "type": "json_schema",
                "json_schema": {
                    "name": "x",
                    "schema": {"type": "object", "properties": {"a": {"type": "nope"}}},
                },
            }
        ),
        400,
        None,
    ),
    (CHAT, _chat(response_format={"type": "yaml"}), 400, "response_format"),
    (CHAT, _chat(tool_choice="required"), 400, "tool_choice"),
    (
        CHAT,
        _chat(
            tools=[{"type": "function", "function": {"name": "f"}}],
            tool_choice={"type": "function", "function": {"name": "g"}},
        ),
        400,
        "tool_choice",
    ),
    (COMPLETIONS, _completion(suffix="x"), 400, "suffix"),
    (COMPLETIONS, _completion(model="gpt-9"), 404, "model"),
    (CHAT, _chat(model="gpt-9"), 404, "model"),
    ("/v1/nothing-here", {}, 404, None),
    (COMPLETIONS, _completion(prompt="x" * (MAX_BODY_BYTES + 1)), 413, None),
]


def _check_error(response: httpx2.Response, status: int, param: str | None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param, error


def test_bad_inputs_get_their_status_and_leave_others_alone(
    server: ServerProcess, http: httpx2.Client, client: openai.OpenAI
) -> None:
    # A request running meanwhile must finish untouched.
    background: dict[str, Any] = {}

    def run_background() -> None:
        background["result"] = client.completions.create(
            model=MODEL,
            prompt="Once upon a time",
            max_tokens=24,
            temperature=0,
            extra_body={"ignore_eos": True},
        )

    thread = threading.Thread(target=run_background)
    thread.start()
    for path, body, status, param in BAD_REQUESTS:
        _check_error(http.post(path, json=body), status, param)
    # Malformed JSON, a body that is not an object, a wrong method.
    headers = {"content-type": "application/json"}
    _check_error(
        http.post(CHAT, content=b'{"model": "smol", "messages": [', headers=headers), 400, None
    )
    _check_error(http.post(CHAT, content=b"[1, 2]", headers=headers), 400, None)
    _check_error(http.get(CHAT), 405, None)
    # API key: missing or wrong is 401; probes need none.
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        response = httpx2.post(server.url + CHAT, json=_chat(), headers=headers)
        _check_error(response, 401, None)
        assert response.json()["error"]["code"] == "invalid_api_key"
    assert httpx2.get(server.url + "/v1/models").status_code == 401
    assert httpx2.get(server.url + "/health").status_code == 200
    assert httpx2.get(server.url + "/metrics").status_code == 200
    thread.join(timeout=300)
    result = background["result"]
    assert result.choices[0].finish_reason == "length"
    assert result.usage.completion_tokens == 24
    # The engine still serves.
    assert (
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=2).usage.completion_tokens
        == 2
    )


def test_openai_client_raises_typed_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL, messages=USER, temperature=9)
    assert bad.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="missing", messages=USER)
    wrong_key = openai.OpenAI(base_url=str(client.base_url), api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong_key.models.list()
