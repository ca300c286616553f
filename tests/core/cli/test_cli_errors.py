"""A user's mistake is one line on stderr and exit status 2; ``--debug`` shows the
traceback; a bug keeps its traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvplane.cli import main as cli_main
from kvplane.cli.main import main


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", "--model", "/nonexistent", "hi"], "is not a local directory or file"),
        (["serve", "/nonexistent"], "is not a local directory or file"),
        (["generate", "--device", "nosuchchip", "hi"], "no platform named 'nosuchchip'"),
    ],
)
def test_user_error_is_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvplane: error: ") and message in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_not_a_gguf_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not a model")
    assert main(["generate", "--model", str(text_file), "hi"]) == 2
    assert "not a .gguf" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [["--debug"], ["--log-level", "debug"]])
def test_debug_shows_the_traceback(flags: list[str]) -> None:
    with pytest.raises(ValueError, match="is not a local directory or file"):
        main([*flags, "generate", "--model", "/nonexistent", "hi"])


def test_log_level_env_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cli_main.LOG_LEVEL_ENV, "debug")
    with pytest.raises(ValueError):
        main(["generate", "--model", "/nonexistent", "hi"])


@pytest.mark.parametrize(
    "argv",
    [
        ["bench", "throughput", "--num-prompts", "-3"],
        ["bench", "throughput", "--input-len", "0"],
        ["bench", "latency", "--batch-size", "x"],
    ],
)
def test_bad_numbers_are_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "error: argument" in capsys.readouterr().err


def test_a_bug_keeps_its_traceback() -> None:
    assert not cli_main.is_user_error(KeyError("internal"))
    assert not cli_main.is_user_error(IndexError())
    assert cli_main.is_user_error(ValueError("bad value"))


def test_serve_checks_its_port_before_loading_the_model(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--host", "127.0.0.1", "--port", str(port)]) == 2
    assert "Address already in use; pass another --port" in capsys.readouterr().err


def test_serve_names_the_bad_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--port", "80000"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvplane: error: --port: ") and "65535 (got 80000)" in err
    assert "pydantic.dev" not in err and err.count("\n") == 1


def test_serve_logs_at_info_and_other_commands_at_warning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(cli_main.LOG_LEVEL_ENV, raising=False)
    parser = cli_main.build_parser()
    assert parser.parse_args(["serve"]).default_log_level == "INFO"
    assert not hasattr(parser.parse_args(["platforms"]), "default_log_level")
    assert parser.parse_args(["serve"]).log_level is None  # the command's default applies
