"""The offline API: ``LLM.generate`` without SamplingParams uses the model's recommended
sampling (``get_default_sampling_params``, as in vLLM); given params apply as they are.

A tiny random-weight model whose directory carries a generation_config.json; the params
the engine receives are captured (nothing is generated)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from kvplane import LLM, SamplingParams
from kvplane.testing.models import save_random_model, tiny_llama_config

GENERATION_CONFIG = {"do_sample": True, "temperature": 0.6, "top_p": 0.8, "max_new_tokens": 9}


class Captured(Exception):
    def __init__(self, params: list[SamplingParams]) -> None:
        super().__init__("captured")
        self.params = params


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-with-generation-config")
    save_random_model(tiny_llama_config(), directory)
    (directory / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG))
    return directory


def make_llm(model_dir: Path, **options: Any) -> LLM:
    return LLM(
        str(model_dir),
        device="cpu",
        dtype="float32",
        skip_tokenizer_init=True,  # no tokenizer files; nothing is decoded
        kv_cache_memory_bytes=2**20,
        **options,
    )


def params_of_generate(llm: LLM, monkeypatch: pytest.MonkeyPatch, *args: Any) -> list[Any]:
    """The SamplingParams ``llm.generate(prompts, *args)`` hands the engine, per prompt."""
    seen: list[SamplingParams] = []

    def add_request(request_id: str, prompt: Any, params: SamplingParams, **kwargs: Any) -> int:
        seen.append(params)
        if len(seen) == 2:
            raise Captured(seen)
        return len(prompt)  # the engine returns the prompt's token count

    monkeypatch.setattr(llm.engine, "add_request", add_request)
    monkeypatch.setattr(llm.engine, "abort_request", lambda request_ids: None)
    with pytest.raises(Captured):
        llm.generate([[1, 2, 3], [4, 5]], *args)
    return seen


def test_generate_without_params_uses_the_models_defaults(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="kvplane.models.config"):
        llm = make_llm(model_dir)
    assert (
        "sampling defaults from the model's generation_config.json: temperature=0.6, "
        "top_p=0.8, max_tokens=9 (a request's own values win" in caplog.text
    )
    defaults = llm.get_default_sampling_params()
    assert (defaults.temperature, defaults.top_p, defaults.top_k, defaults.max_tokens) == (
        0.6,
        0.8,
        0,
        9,
    )
    assert llm.get_default_sampling_params() is not defaults  # a fresh copy each time
    first, second = params_of_generate(llm, monkeypatch)
    assert first is not second
    for params in (first, second):
        assert (params.temperature, params.top_p, params.max_tokens) == (0.6, 0.8, 9)


def test_given_params_apply_as_they_are(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    llm = make_llm(model_dir)
    mine = SamplingParams(temperature=0.3)
    for params in params_of_generate(llm, monkeypatch, mine):
        assert (params.temperature, params.top_p, params.max_tokens) == (0.3, 1.0, 16)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"generation_config": "kvplane"}, (1.0, 1.0, 16)),
        ({"override_generation_config": {"temperature": 0.5}}, (0.5, 0.8, 9)),
    ],
    ids=["kvplane", "override"],
)
def test_engine_options_choose_the_defaults(
    model_dir: Path, options: dict[str, Any], expected: tuple[float, float, int]
) -> None:
    defaults = make_llm(model_dir, **options).get_default_sampling_params()
    assert (defaults.temperature, defaults.top_p, defaults.max_tokens) == expected


def test_a_generation_config_path_wins_over_the_models_file(
    model_dir: Path, tmp_path: Path
) -> None:
    (tmp_path / "generation_config.json").write_text(json.dumps({"top_p": 0.5}))
    defaults = make_llm(model_dir, generation_config=str(tmp_path)).get_default_sampling_params()
    assert (defaults.temperature, defaults.top_p, defaults.max_tokens) == (1.0, 0.5, 16)
