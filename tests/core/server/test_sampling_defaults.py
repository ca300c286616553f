"""The model's recommended sampling fills what a request leaves out, field by field, in
/v1/completions and /v1/chat/completions; ``--generation-config kvplane`` ignores it.

In process, on a tiny random-weight model whose directory carries a generation_config.json;
the handlers' SamplingParams are captured where the run is created (nothing is generated).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvplane.engine.async_llm import AsyncLLM
from kvplane.sampling.params import SamplingParams
from kvplane.server import chat
from kvplane.server.chat import create_chat_completion
from kvplane.server.completions import create_completion
from kvplane.server.protocol import ChatCompletionRequest, CompletionRequest
from kvplane.server.settings import ServerSettings
from kvplane.server.state import ServerState
from kvplane.testing.models import save_random_model, tiny_llama_config

GENERATION_CONFIG = {"temperature": 0.6, "top_p": 0.8, "top_k": 20, "max_new_tokens": 7}


class Captured(Exception):
    """Raised instead of starting a run, carrying the params the handler built."""

    def __init__(self, params: SamplingParams) -> None:
        super().__init__("captured")
        self.params = params


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-with-generation-config")
    save_random_model(tiny_llama_config(), directory)
    (directory / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG))
    return directory


def make_state(model_dir: Path, **options: Any) -> Iterator[ServerState]:
    settings = ServerSettings(  # type: ignore[call-arg]  # pydantic fills the defaults
        model=str(model_dir),
        device="cpu",
        dtype="float32",
        skip_tokenizer_init=True,
        kv_cache_memory_bytes=2**20,
        **options,
    )
    engine = AsyncLLM.from_config(settings.engine_config())
    try:
        yield ServerState.create(engine, settings)
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def state(model_dir: Path) -> Iterator[ServerState]:
    yield from make_state(model_dir)


@pytest.fixture(scope="module")
def engine_defaults_state(model_dir: Path) -> Iterator[ServerState]:
    yield from make_state(model_dir, generation_config="kvplane")


@pytest.fixture(autouse=True)
def capture_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    def new_run(self: ServerState, prefix: str, prompts: Any, params: SamplingParams,
                priority: int = 0) -> Any:  # fmt: skip
        raise Captured(params)

    monkeypatch.setattr(ServerState, "new_run", new_run)

    # No tokenizer here: the chat template is not the subject.
    async def render_conversation(*args: Any) -> list[int]:
        return [1, 2, 3]

    monkeypatch.setattr(chat, "render_conversation", render_conversation)


def completion_params(state: ServerState, **fields: Any) -> SamplingParams:
    body = CompletionRequest.model_validate({"prompt": [1, 2, 3], **fields})
    with pytest.raises(Captured) as captured:
        asyncio.run(create_completion(state, body, None))  # type: ignore[arg-type]
    return captured.value.params


def chat_params(state: ServerState, **fields: Any) -> SamplingParams:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    body = ChatCompletionRequest.model_validate({"messages": messages, **fields})
    with pytest.raises(Captured) as captured:
        asyncio.run(create_chat_completion(state, body, None))  # type: ignore[arg-type]
    return captured.value.params


def sampling(params: SamplingParams) -> tuple[float, float, int, float, int | None]:
    return params.temperature, params.top_p, params.top_k, params.min_p, params.max_tokens


def test_the_state_carries_the_models_defaults(state: ServerState) -> None:
    assert dict(state.sampling_defaults.values) == {
        "temperature": 0.6,
        "top_p": 0.8,
        "top_k": 20,
        "max_tokens": 7,
    }


def test_a_request_that_sets_nothing_gets_the_models_defaults(state: ServerState) -> None:
    # max_new_tokens is the default max_tokens where the request has none (chat); a
    # completion's max_tokens defaults to 16 in the API itself, as in OpenAI's and vLLM's.
    assert sampling(chat_params(state)) == (0.6, 0.8, 20, 0.0, 7)
    assert sampling(completion_params(state)) == (0.6, 0.8, 20, 0.0, 16)
    assert sampling(completion_params(state, max_tokens=None)) == (0.6, 0.8, 20, 0.0, 7)


@pytest.mark.parametrize("build", [chat_params, completion_params], ids=["chat", "completions"])
def test_request_values_win_field_by_field(state: ServerState, build: Any) -> None:
    params = build(state, temperature=0.1, max_tokens=3)
    assert sampling(params) == (0.1, 0.8, 20, 0.0, 3)  # top_p and top_k: still the model's
    params = build(state, temperature=0, top_p=1.0, top_k=-1, min_p=0.1)
    assert (params.temperature, params.top_p, params.top_k, params.min_p) == (0.0, 1.0, 0, 0.1)
    assert params.repetition_penalty == 1.0  # neither the request nor the file set it


def test_chat_max_completion_tokens_wins_over_the_models_max_new_tokens(
    state: ServerState,
) -> None:
    assert chat_params(state, max_completion_tokens=30).max_tokens == 30


def test_generation_config_kvplane_ignores_the_models_file(
    engine_defaults_state: ServerState,
) -> None:
    assert dict(engine_defaults_state.sampling_defaults.values) == {}
    assert sampling(chat_params(engine_defaults_state)) == (1.0, 1.0, 0, 0.0, None)
    assert sampling(completion_params(engine_defaults_state)) == (1.0, 1.0, 0, 0.0, 16)


def test_override_generation_config_comes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KVPLANE_OVERRIDE_GENERATION_CONFIG", '{"temperature": 0.5}')
    monkeypatch.setenv("KVPLANE_GENERATION_CONFIG", "kvplane")
    config = ServerSettings().engine_config()  # type: ignore[call-arg]
    assert config.override_generation_config == {"temperature": 0.5}
    assert config.generation_config == "kvplane"
