"""``speculative_config``: vLLM's spelling parsed, every mistake a clear ValueError, and the
``--speculative-config`` flag of every command."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from kvplane.cli.engine_args import add_engine_arguments, engine_config_from_args
from kvplane.cli.main import main
from kvplane.config import EngineConfig
from kvplane.spec_decode.config import (
    DEFAULT_DISABLE_BY_BATCH_SIZE,
    SpeculativeConfig,
    parse_speculative_config,
)


def test_ngram_as_vllm_spells_it() -> None:
    config = parse_speculative_config(
        {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2,
         "prompt_lookup_max": 5}
    )  # fmt: skip
    assert config == SpeculativeConfig("ngram", 4, 2, 5)
    assert config.disable_by_batch_size == DEFAULT_DISABLE_BY_BATCH_SIZE


def test_prompt_lookup_defaults_follow_vllm() -> None:
    both = parse_speculative_config({"method": "ngram", "num_speculative_tokens": 3})
    assert (both.prompt_lookup_min, both.prompt_lookup_max) == (5, 5)
    only_max = parse_speculative_config(
        {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4}
    )
    assert (only_max.prompt_lookup_min, only_max.prompt_lookup_max) == (4, 4)


def test_a_model_without_a_method_is_a_draft_model() -> None:
    config = parse_speculative_config({"model": "/m", "num_speculative_tokens": 2})
    assert config.method == "draft_model" and config.model == "/m"
    assert config.to_dict() == {
        "method": "draft_model",
        "num_speculative_tokens": 2,
        "model": "/m",
        "disable_by_batch_size": DEFAULT_DISABLE_BY_BATCH_SIZE,
    }


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"num_speculative_tokens": 2}, "needs a 'method'"),
        ({"method": "ngramm", "num_speculative_tokens": 2}, "must be one of"),
        ({"method": "eagle", "model": "/m", "num_speculative_tokens": 2}, "not supported"),
        ({"method": "ngram"}, "needs 'num_speculative_tokens'"),
        ({"method": "ngram", "num_speculative_tokens": 0}, "'num_speculative_tokens' must be"),
        ({"method": "ngram", "num_speculative_tokens": "4"}, "must be an int"),
        ({"method": "ngram", "num_speculative_tokens": True}, "must be an int"),
        ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4,
          "prompt_lookup_max": 2}, "must not exceed"),
        ({"method": "ngram", "num_speculative_tokens": 2, "model": "/m"}, "belongs to method"),
        ({"method": "draft_model", "num_speculative_tokens": 2}, "needs 'model'"),
        ({"method": "draft_model", "model": "/m", "num_speculative_tokens": 2,
          "prompt_lookup_max": 3}, "belongs to method 'ngram'"),
        ({"method": "ngram", "num_speculative_tokens": 2, "num_lookahead": 1}, "unknown keys"),
        ({"method": "ngram", "num_speculative_tokens": 2, "disable_by_batch_size": -1},
         "'disable_by_batch_size' must be"),
        (["ngram"], "must be a JSON object"),
    ],
)  # fmt: skip
def test_mistakes_are_clear_value_errors(value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_speculative_config(value)
    with pytest.raises(ValueError, match=message):  # before any model loads
        EngineConfig(speculative_config=value)


def test_the_flag_takes_json() -> None:
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    args = parser.parse_args(
        ["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}']
    )
    config = engine_config_from_args(args)
    assert config.speculative_config == {"method": "ngram", "num_speculative_tokens": 3}
    resolved = config.resolved_speculative_config()
    assert resolved is not None and resolved.num_speculative_tokens == 3


@pytest.mark.parametrize("command", [["generate"], ["serve"], ["bench", "throughput"]])
def test_every_command_names_a_bad_config(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [*command, "--speculative-config", '{"method": "ngram"}']
    if command == ["generate"]:
        argv.append("hi")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvplane: error: ") and "num_speculative_tokens" in err
    assert "Traceback" not in err


def test_not_json_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["generate", "--speculative-config", "{method: ngram}", "hi"])
    assert "not valid JSON" in capsys.readouterr().err
