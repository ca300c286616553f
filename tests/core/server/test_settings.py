"""``kvplane serve`` options: flags, ``KVPLANE_*`` variables and precedence."""

from __future__ import annotations

import dataclasses

import pytest
from pydantic import ValidationError

from kvplane.cli.main import build_parser
from kvplane.cli.serve import run
from kvplane.config import INTERNAL_FIELDS, EngineConfig
from kvplane.server.settings import DEFAULT_MODEL_NAME, ServerOptions, ServerSettings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("KVPLANE_"):
            monkeypatch.delenv(name)


def parse(*argv: str) -> dict[str, object]:
    args = build_parser().parse_args(["serve", *argv])
    ignored = ("handler", "log_level", "debug", "default_log_level", "command")
    return {k: v for k, v in vars(args).items() if k not in ignored}


def test_every_engine_and_server_option_is_a_flag_and_a_setting() -> None:
    parser_dests = {
        action.dest
        for action in build_parser()._subparsers._group_actions[0].choices["serve"]._actions  # type: ignore[union-attr]
    }
    engine_fields = {field.name for field in dataclasses.fields(EngineConfig)}
    engine_fields -= set(INTERNAL_FIELDS)
    server_fields = set(ServerOptions.model_fields)
    assert engine_fields | server_fields <= parser_dests
    assert engine_fields | server_fields == set(ServerSettings.model_fields)


def test_only_given_flags_are_parsed() -> None:
    assert parse() == {"model_tag": None}
    assert parse("/models/x", "--port", "9", "--no-access-log", "--max-num-seqs", "4") == {
        "model_tag": "/models/x",
        "port": 9,
        "access_log": False,
        "max_num_seqs": 4,
    }
    assert parse("--served-model-name", "a", "b")["served_model_name"] == ["a", "b"]


def test_flags_win_over_environment_over_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = ServerSettings()
    assert defaults.port == 8000 and defaults.max_num_seqs == EngineConfig().max_num_seqs
    assert defaults.model_names() == [DEFAULT_MODEL_NAME]
    monkeypatch.setenv("KVPLANE_PORT", "9100")
    monkeypatch.setenv("KVPLANE_MAX_NUM_SEQS", "7")
    monkeypatch.setenv("KVPLANE_ENABLE_PREFIX_CACHING", "false")
    monkeypatch.setenv("KVPLANE_SERVED_MODEL_NAME", "one, two")
    settings = ServerSettings(max_num_seqs=3)
    assert settings.port == 9100
    assert settings.max_num_seqs == 3
    assert settings.model_names() == ["one", "two"]
    config = settings.engine_config()
    assert config.max_num_seqs == 3 and config.enable_prefix_caching is False
    assert config.usage == "online"  # a server's engine: the online batch limits


def test_model_names_default_to_the_model_given() -> None:
    assert ServerSettings(model="/models/llama").model_names() == ["/models/llama"]


def test_invalid_options_exit_2_without_serving(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KVPLANE_PORT", "not-a-port")
    with pytest.raises(ValidationError):
        ServerSettings()
    args = build_parser().parse_args(["serve"])
    assert run(args) == 2
    monkeypatch.delenv("KVPLANE_PORT")
    assert run(build_parser().parse_args(["serve", "--block-size", "3"])) == 2
    assert run(build_parser().parse_args(["serve", "a", "--model", "b"])) == 2
    err = capsys.readouterr().err
    assert err.count("kvplane: error: ") == 3
    assert "--port: Input should be a valid integer" in err and "block_size" in err
