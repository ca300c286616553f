"""Errors and the schema, on the real app (``build_app``) under uvicorn in this process,
with a stand-in engine: everything here is answered before a request reaches the engine.

Range checks (every number a 400 naming its field), text that is not Unicode, what the
schema says (400 not 422, the server's limits), 405's ``Allow``, 503's ``Retry-After``,
and a keep-alive connection that survives a 500. The real server and schemathesis:
``test_openapi.py``.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import httpx2
import pytest
import uvicorn

from kvplane.engine.async_llm import EngineDeadError
from kvplane.scheduler.output import SchedulerStats
from kvplane.server.app import build_app
from kvplane.server.metrics import ServerMetrics
from kvplane.server.settings import ServerOptions
from kvplane.server.state import ServerState

VOCAB_SIZE = 1000
MAX_MODEL_LEN = 64
MAX_NUM_SEQS = 4
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "Hi"}]


class _Engine:
    """What the handlers read of ``AsyncLLM`` before they submit a request."""

    def __init__(self) -> None:
        hf_config = SimpleNamespace(vocab_size=VOCAB_SIZE)
        self.model_config = SimpleNamespace(hf_config=hf_config)
        self.is_running = True
        self.num_waiting = 0


def _state() -> ServerState:
    return ServerState(
        engine=_Engine(),  # type: ignore[arg-type]
        settings=ServerOptions(api_key=None, max_waiting_requests=2),
        model_names=["m"],
        tokenizer=None,
        tokenizer_pool=None,
        max_model_len=MAX_MODEL_LEN,
        max_num_seqs=MAX_NUM_SEQS,
        metrics=ServerMetrics("m", lambda: SchedulerStats(0, 0, 0.0, 0, 0, 0)),
    )


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[str, ServerState, uvicorn.Server]]:
    """``build_app`` under uvicorn on a free port, on a thread of this process."""
    state = _state()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = uvicorn.Config(
        build_app(state), host="127.0.0.1", port=port, log_level="warning", lifespan="off"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    yield f"http://127.0.0.1:{port}", state, server
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture()
def http(served: tuple[str, ServerState, uvicorn.Server]) -> Iterator[httpx2.Client]:
    with httpx2.Client(base_url=served[0], timeout=30) as client:
        yield client


def _completion(**fields: Any) -> dict[str, Any]:
    return {"prompt": [1, 2, 3], "max_tokens": 4, **fields}


def _chat(**fields: Any) -> dict[str, Any]:
    return {"messages": USER, "max_tokens": 4, **fields}


def _expect_400(response: httpx2.Response, param: str) -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error


# (path, body, the param the 400 names)
OUT_OF_RANGE = [
    (COMPLETIONS, _completion(top_k=2**63), "top_k"),
    (COMPLETIONS, _completion(top_k=-2), "top_k"),
    (CHAT, _chat(top_k=2**53), "top_k"),
    (COMPLETIONS, _completion(seed=2**63), "seed"),
    (CHAT, _chat(seed=-(2**63) - 1), "seed"),
    (COMPLETIONS, _completion(n=0), "n"),
    (COMPLETIONS, _completion(n=MAX_NUM_SEQS + 1), "n"),
    (COMPLETIONS, _completion(n=True), "n"),
    (COMPLETIONS, _completion(best_of=0), "best_of"),
    (COMPLETIONS, _completion(max_tokens=0), "max_tokens"),
    (COMPLETIONS, _completion(max_tokens=2**63), "max_tokens"),
    (COMPLETIONS, _completion(max_tokens="5"), "max_tokens"),
    (CHAT, _chat(max_completion_tokens=2**53), "max_completion_tokens"),
    (COMPLETIONS, _completion(min_tokens=-1), "min_tokens"),
    (COMPLETIONS, _completion(logprobs=-1), "logprobs"),
    (COMPLETIONS, _completion(logprobs=21), "logprobs"),
    (COMPLETIONS, _completion(prompt_logprobs=2**63), "prompt_logprobs"),
    (CHAT, _chat(logprobs=True, top_logprobs=-1), "top_logprobs"),
    (CHAT, _chat(logprobs=1), "logprobs"),
    (COMPLETIONS, _completion(logit_bias={"5": 101}), "logit_bias"),
    (COMPLETIONS, _completion(logit_bias={"5": -100.5}), "logit_bias"),
    (COMPLETIONS, _completion(logit_bias={"-1": 1}), "logit_bias"),
    (COMPLETIONS, _completion(logit_bias={"007": 1}), "logit_bias"),
    (COMPLETIONS, _completion(logit_bias={str(VOCAB_SIZE): 1}), "logit_bias"),
    (COMPLETIONS, _completion(prompt=[VOCAB_SIZE]), "prompt"),
    (COMPLETIONS, _completion(prompt=[[1], [-1]]), "prompt.1.0"),
    (COMPLETIONS, _completion(prompt=[[1], []]), "prompt.1"),
    (COMPLETIONS, _completion(prompt=[True]), "prompt.0"),
    (COMPLETIONS, _completion(prompt=list(range(MAX_MODEL_LEN))), "prompt"),
    (COMPLETIONS, _completion(stop_token_ids=[VOCAB_SIZE]), "stop_token_ids"),
    (COMPLETIONS, _completion(stop_token_ids=[-1]), "stop_token_ids.0"),
    (CHAT, _chat(allowed_token_ids=[]), "allowed_token_ids"),
    (CHAT, _chat(allowed_token_ids=[2**63]), "allowed_token_ids.0"),
    (COMPLETIONS, _completion(priority=2**63), "priority"),
    (COMPLETIONS, _completion(temperature=2.5), "temperature"),
    (COMPLETIONS, _completion(top_p=0), "top_p"),
    (COMPLETIONS, _completion(min_p=1.5), "min_p"),
    (CHAT, _chat(presence_penalty=-2.5), "presence_penalty"),
    (CHAT, _chat(frequency_penalty=3), "frequency_penalty"),
    (CHAT, _chat(repetition_penalty=0), "repetition_penalty"),
    (CHAT, _chat(stream=1), "stream"),
    (COMPLETIONS, _completion(suffix="x"), "suffix"),
    ("/detokenize", {"tokens": [False]}, "tokens.0"),
    ("/detokenize", {"tokens": [1.5]}, "tokens.0"),
]


@pytest.mark.parametrize(("path", "body", "param"), OUT_OF_RANGE)
def test_every_number_out_of_range_is_a_400_naming_it(
    http: httpx2.Client, path: str, body: dict[str, Any], param: str
) -> None:
    _expect_400(http.post(path, json=body), param)


@pytest.mark.parametrize(
    ("field", "raw"),
    [("temperature", "NaN"), ("top_p", "Infinity"), ("presence_penalty", "-Infinity")],
)
def test_floats_must_be_finite(http: httpx2.Client, field: str, raw: str) -> None:
    content = f'{{"prompt": [1], "max_tokens": 4, "{field}": {raw}}}'.encode()
    headers = {"content-type": "application/json"}
    _expect_400(http.post(COMPLETIONS, content=content, headers=headers), field)


def test_whole_floats_are_integers(http: httpx2.Client) -> None:
    # JSON Schema's integers include 4.0; 4.5 is not one.
    _expect_400(http.post("/detokenize", json={"tokens": [1.0, 2.5]}), "tokens.1")
    response = http.post(COMPLETIONS, json=_completion(n=float(MAX_NUM_SEQS + 1)))
    _expect_400(response, "n")  # read as the integer 5, then checked against the limit


# JSON escapes for a lone surrogate: the text is not Unicode (json.loads lets it through).
LONE_SURROGATE = [
    (COMPLETIONS, '{"prompt": "\\ud800", "max_tokens": 4}', "prompt"),
    (COMPLETIONS, '{"prompt": ["ok", "a\\udfff"], "max_tokens": 4}', "prompt.1"),
    (COMPLETIONS, '{"prompt": [1], "stop": ["\\ud800"]}', "stop.0"),
    (COMPLETIONS, '{"prompt": [1], "model": "\\ud800"}', "model"),
    (CHAT, '{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages.0.content"),
    (
        CHAT,
        '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udc00"}]}]}',
        "messages.0.content.0.text",
    ),
    (CHAT, '{"messages": [{"role": "user", "content": "x", "extra": "\\ud800"}]}', "messages.0"),
    (
        CHAT,
        '{"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", '
        '"function": {"name": "f", "parameters": {"\\ud800": 1}}}]}',
        "tools.0.function.parameters",
    ),
    ("/tokenize", '{"prompt": "\\ud800"}', "prompt"),
    ("/tokenize", '{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages.0.content"),
]


@pytest.mark.parametrize(("path", "content", "param"), LONE_SURROGATE)
def test_a_lone_surrogate_is_a_400_naming_the_field(
    http: httpx2.Client, path: str, content: str, param: str
) -> None:
    headers = {"content-type": "application/json"}
    response = http.post(path, content=content.encode(), headers=headers)
    _expect_400(response, param)
    assert "surrogate" in response.json()["error"]["message"]


def test_the_schema_documents_400_not_422_and_this_servers_limits(http: httpx2.Client) -> None:
    schema = http.get("/openapi.json").json()
    operation_ids = [op["operationId"] for ops in schema["paths"].values() for op in ops.values()]
    assert len(operation_ids) == len(set(operation_ids))
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            assert "422" not in responses, (method, path)
            assert "500" in responses, (method, path)
            if "requestBody" in operation:
                assert {"400", "413", "503"} <= set(responses), (method, path)
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    assert "x-kvplane-limit" not in str(schema)
    request = schema["components"]["schemas"]["DetokenizeRequest"]
    assert request["properties"]["tokens"]["items"]["maximum"] == VOCAB_SIZE - 1
    completion = schema["components"]["schemas"]["CompletionRequest"]["properties"]
    assert completion["n"]["maximum"] == MAX_NUM_SEQS
    assert completion["top_k"]["anyOf"][0]["maximum"] == 2**53 - 1
    stream = schema["paths"][COMPLETIONS]["post"]["responses"]["200"]["content"]
    assert set(stream) == {"application/json", "text/event-stream"}


def test_405_lists_the_allowed_methods(http: httpx2.Client) -> None:
    for method, path, allowed in [
        ("GET", COMPLETIONS, "POST"),
        ("DELETE", "/health", "GET, HEAD"),
        ("TRACE", "/v1/models", "GET"),
    ]:
        response = http.request(method, path)
        assert response.status_code == 405
        assert sorted(response.headers["allow"].split(", ")) == sorted(allowed.split(", "))
        assert response.json()["error"]["type"] == "invalid_request_error"


def test_overloaded_503_says_when_to_retry(
    served: tuple[str, ServerState, uvicorn.Server], http: httpx2.Client
) -> None:
    engine = served[1].engine
    engine.num_waiting = 2  # type: ignore[misc]  # the limit (max_waiting_requests)
    try:
        response = http.post(COMPLETIONS, json=_completion())
    finally:
        engine.num_waiting = 0  # type: ignore[misc]
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "server_overloaded"
    assert response.headers["retry-after"] == "1"


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (RuntimeError("a bug"), 500, None),
        (EngineDeadError("the engine stopped"), 503, "engine_dead"),
    ],
)
def test_an_unexpected_error_leaves_the_connection_usable(
    served: tuple[str, ServerState, uvicorn.Server],
    http: httpx2.Client,
    monkeypatch: pytest.MonkeyPatch,
    error: Exception,
    status: int,
    code: str | None,
) -> None:
    def fail(self: ServerState, name: str | None) -> None:
        raise error

    metrics = served[1].metrics.registry
    labels = {"model_name": "m", "method": "GET", "route": "/v1/models/{model:path}"}
    before = metrics.get_sample_value(
        "kvplane:http_request_errors_total", {**labels, "error": "exception"}
    )
    monkeypatch.setattr(ServerState, "check_model", fail)
    connections = served[2].server_state.connections
    used = set()
    for _ in range(3):
        failed = http.get("/v1/models/m")
        assert failed.status_code == status
        assert failed.headers.get("connection") != "close"
        body = failed.json()["error"]
        assert body["type"] == "server_error" and body["code"] == code
        # The next request goes on the same connection and is answered.
        assert http.get("/version").status_code == 200
        used |= {id(connection) for connection in connections}
    assert len(used) == 1  # one connection throughout
    after = metrics.get_sample_value(
        "kvplane:http_request_errors_total", {**labels, "error": "exception"}
    )
    assert after == (before or 0) + 3


def test_prompt_and_max_tokens_past_the_context_is_a_400(http: httpx2.Client) -> None:
    too_many = MAX_MODEL_LEN - 2  # 3 prompt tokens + 62 > 64
    response = http.post(COMPLETIONS, json=_completion(max_tokens=too_many))
    _expect_400(response, "max_tokens")
    assert response.json()["error"]["message"] == (
        f"This model's maximum context length is {MAX_MODEL_LEN} tokens. However, you "
        f"requested {too_many + 3} tokens (3 in the prompt, {too_many} in the completion). "
        "Please reduce the length of the prompt or completion."
    )
    # Exactly the context: not refused for its length (the stub engine then fails it).
    fits = http.post(COMPLETIONS, json=_completion(max_tokens=MAX_MODEL_LEN - 3))
    assert fits.status_code != 400, fits.text
