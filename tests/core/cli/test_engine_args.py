"""Engine flags: every EngineConfig option becomes a flag; booleans take --no-*, and an
optional boolean (None = the platform decides) stays None unless given."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from kvplane.cli.engine_args import add_engine_arguments, engine_config_from_args


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize(
    ("argv", "expected"),
    [((), None), (("--async-scheduling",), True), (("--no-async-scheduling",), False)],
)
def test_async_scheduling_flag(argv: tuple[str, ...], expected: bool | None) -> None:
    config = engine_config_from_args(parse(*argv))
    assert config.async_scheduling is expected


def test_enforce_eager_and_numbers() -> None:
    config = engine_config_from_args(parse("--enforce-eager", "--max-num-seqs", "8"))
    assert config.enforce_eager is True and config.max_num_seqs == 8
    assert engine_config_from_args(parse()).enforce_eager is False


@pytest.mark.parametrize(
    "argv",
    [
        ["platforms", "--devic", "cpu"],
        ["serve", "--devic", "cpu"],
        ["bench", "throughput", "--num-prom", "3"],
    ],
)
def test_abbreviated_flags_are_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from kvplane.cli.main import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


@pytest.mark.parametrize(
    "command", [["serve"], ["generate"], ["bench", "throughput"], ["bench", "latency"]]
)
def test_help_states_each_default_once(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    import re

    from kvplane.cli.main import main

    with pytest.raises(SystemExit):
        main([*command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert not re.search(r"\(default: [^)]*\) \(default:", text)
    assert "default: None" not in text


def test_generation_config_flags(tmp_path: Path) -> None:
    assert engine_config_from_args(parse()).generation_config == "auto"
    config = engine_config_from_args(
        parse("--generation-config", "kvplane", "--override-generation-config", '{"top_p": 0.5}')
    )
    assert config.generation_config == "kvplane"
    assert config.override_generation_config == {"top_p": 0.5}
    (tmp_path / "generation_config.json").write_text('{"temperature": 0.3}')
    path_config = engine_config_from_args(parse("--generation-config", str(tmp_path)))
    assert path_config.generation_config == str(tmp_path)


@pytest.mark.parametrize("value", ["{not json", "[1]"])
def test_override_generation_config_must_be_a_json_object(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse("--override-generation-config", value)
    assert exit_info.value.code == 2
    assert "argument --override-generation-config:" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["serve"], ["generate", "hello"]])
def test_a_bad_generation_config_path_is_a_one_line_error(
    command: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from kvplane.cli.main import main

    missing = str(tmp_path / "missing")
    assert main([*command, "--generation-config", missing]) == 2
    error = capsys.readouterr().err
    assert error.startswith("kvplane: error: generation_config must be 'auto', 'kvplane'")
    assert f"{missing!r} does not exist" in error
    assert main([*command, "--generation-config", str(tmp_path)]) == 2
    assert "holds no generation_config.json" in capsys.readouterr().err
