"""Sampling defaults from ``--generation-config``: the model's generation_config.json, the
embedded model's recommendation, kvplane's own, a path, and overrides. No weights load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvplane.config import EngineConfig
from kvplane.models.generation_config import resolve_sampling_defaults
from kvplane.models.source import ModelSource, resolve_model

#: A generation_config.json as models ship them: sampling keys among others.
MODEL_FILE = {
    "bos_token_id": 1,
    "eos_token_id": [2, 3],
    "do_sample": True,
    "temperature": 0.6,
    "top_p": 0.8,
    "top_k": 20,
    "repetition_penalty": 1.05,
    "max_new_tokens": 64,
    "transformers_version": "4.45.0",
}


def hf_dir(path: Path, generation_config: dict[str, object] | None = MODEL_FILE) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    if generation_config is not None:
        (path / "generation_config.json").write_text(json.dumps(generation_config))
    return path


def test_auto_takes_the_sampling_keys_of_the_models_file(tmp_path: Path) -> None:
    defaults = resolve_sampling_defaults(resolve_model(str(hf_dir(tmp_path))))
    assert dict(defaults.values) == {
        "temperature": 0.6,
        "top_p": 0.8,
        "top_k": 20,
        "repetition_penalty": 1.05,
        "max_tokens": 64,  # max_new_tokens, as vLLM maps it
    }
    params = defaults.sampling_params()
    assert (params.temperature, params.top_p, params.top_k, params.max_tokens) == (
        0.6,
        0.8,
        20,
        64,
    )
    assert params.min_p == 0.0  # not in the file: kvplane's default
    assert "the model's generation_config.json: temperature=0.6, top_p=0.8" in (defaults.describe())


def test_embedded_model_gets_its_authors_recommendation() -> None:
    source = resolve_model(None)
    defaults = resolve_sampling_defaults(source)
    assert dict(defaults.values) == {"temperature": 0.2, "top_p": 0.9}
    assert "SmolLM2-135M-Instruct" in defaults.describe()
    assert "temperature=0.2, top_p=0.9" in defaults.describe()


@pytest.mark.parametrize("name", ["kvplane", "vllm"])
def test_engine_defaults_ignore_the_model(tmp_path: Path, name: str) -> None:
    for source in (resolve_model(str(hf_dir(tmp_path))), resolve_model(None)):
        defaults = resolve_sampling_defaults(source, name)
        assert dict(defaults.values) == {}
        params = defaults.sampling_params()
        assert (params.temperature, params.top_p, params.top_k, params.max_tokens) == (
            1.0,
            1.0,
            0,
            16,
        )
        assert f"kvplane's own (temperature=1.0, top_p=1.0), as --generation-config {name}" in (
            defaults.describe()
        )


@pytest.mark.parametrize(
    "contents",
    [None, {"eos_token_id": 2, "_from_model_config": True}],
    ids=["no file", "no sampling keys"],
)
def test_a_model_without_recommendations_keeps_kvplanes(
    tmp_path: Path, contents: dict[str, object] | None
) -> None:
    defaults = resolve_sampling_defaults(resolve_model(str(hf_dir(tmp_path, contents))))
    assert dict(defaults.values) == {}
    assert defaults.describe().startswith("sampling defaults: kvplane's own")


def test_a_built_in_config_has_no_recommendations() -> None:
    defaults = resolve_sampling_defaults(ModelSource(Path("."), builtin_config="qwen3-0.6b"))
    assert dict(defaults.values) == {}


def test_do_sample_false_is_ignored_as_in_vllm(tmp_path: Path) -> None:
    model = hf_dir(tmp_path, {"do_sample": False, "temperature": 0.7, "top_p": None})
    defaults = resolve_sampling_defaults(resolve_model(str(model)))
    assert dict(defaults.values) == {"temperature": 0.7}  # and a null is no default


def test_a_path_names_the_file_or_its_directory(tmp_path: Path) -> None:
    model = resolve_model(str(hf_dir(tmp_path / "model")))
    other = tmp_path / "other"
    other.mkdir()
    (other / "generation_config.json").write_text(json.dumps({"temperature": 0.3}))
    for option in (str(other), str(other / "generation_config.json")):
        defaults = resolve_sampling_defaults(model, option)
        assert dict(defaults.values) == {"temperature": 0.3}  # the model's file is not read
        assert str(other / "generation_config.json") in defaults.describe()


def test_overrides_set_and_remove_single_keys(tmp_path: Path) -> None:
    model = resolve_model(str(hf_dir(tmp_path)))
    defaults = resolve_sampling_defaults(
        model, "auto", {"temperature": 0.5, "min_p": 0.05, "max_new_tokens": None}
    )
    assert dict(defaults.values) == {
        "temperature": 0.5,
        "top_p": 0.8,
        "top_k": 20,
        "repetition_penalty": 1.05,
        "min_p": 0.05,
    }
    assert "and --override-generation-config" in defaults.describe()
    only = resolve_sampling_defaults(model, "kvplane", {"top_p": 0.5})
    assert dict(only.values) == {"top_p": 0.5}
    assert "from --override-generation-config: top_p=0.5" in only.describe()


@pytest.mark.parametrize(
    ("contents", "message"),
    [
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "must hold a JSON object"),
        ('{"temperature": "hot"}', "temperature must be a number, got 'hot'"),
        ('{"top_k": 2.5}', "top_k must be a whole number"),
        ('{"top_p": 1.5}', "top_p must be in (0, 1]"),
    ],
)
def test_bad_files_are_value_errors_naming_the_problem(
    tmp_path: Path, contents: str, message: str
) -> None:
    model = hf_dir(tmp_path, None)
    (model / "generation_config.json").write_text(contents)
    with pytest.raises(ValueError) as error:
        resolve_sampling_defaults(resolve_model(str(model)))
    assert message in str(error.value)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"generation_config": "/no/such/dir"}, "'/no/such/dir' does not exist"),
        ({"generation_config": "autoo"}, "must be 'auto', 'kvplane' or the path"),
        ({"override_generation_config": {"temprature": 0.5}}, "unknown keys ['temprature']"),
        ({"override_generation_config": "0.5"}, "must be a dict"),
    ],
)
def test_engine_config_rejects_bad_options(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError) as error:
        EngineConfig(**options)  # type: ignore[arg-type]
    assert message in str(error.value)


def test_engine_config_rejects_a_directory_without_the_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"holds no generation_config\.json"):
        EngineConfig(generation_config=str(tmp_path))
