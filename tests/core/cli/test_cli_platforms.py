"""``kvplane platforms``: the real console script on this machine, and the table, JSON
and exit codes in-process against fake platforms."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from importlib_metadata import entry_points

from kvplane.cli.main import main
from kvplane.plugins import ENTRY_POINT_GROUP
from kvplane.plugins.types import ProbeResult

KVPLANE = Path(sys.executable).with_name("kvplane")
INSTALLED = {entry_point.name for entry_point in entry_points(group=ENTRY_POINT_GROUP)}
RegisterFake = Callable[..., None]


def _kvplane(*args: str) -> subprocess.CompletedProcess[str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("KVPLANE_DEVICE", "KVPLANE_EMULATE", "KVPLANE_DISABLE_PLUGIN_AUTOLOAD")
    }
    return subprocess.run(
        [str(KVPLANE), *args], env=env, capture_output=True, text=True, timeout=120
    )


def _require(*names: str) -> None:
    missing = [name for name in names if name not in INSTALLED]
    if missing:
        pytest.skip(f"platform packages not installed: {missing}")


# -- the real console script --------------------------------------------------------


@pytest.fixture(scope="module")
def platforms_json() -> dict[str, dict[str, object]]:
    result = _kvplane("platforms", "--json")
    assert result.returncode in (0, 1), result.stderr
    rows = json.loads(result.stdout)
    assert isinstance(rows, list)
    for row in rows:
        assert {"name", "available", "reason", "score", "selected", "error"} <= set(row)
    return {row["name"]: row for row in rows}


def test_console_script_emulates_cuda_when_asked() -> None:
    _require("cuda", "cpu")
    result = _kvplane("platforms", "--json", "--emulate", "cuda")
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    if not rows["cuda"]["can_emulate"]:
        pytest.skip(f"cuda cannot be emulated here: {rows['cuda']['emulation']}")
    assert result.returncode == 0, result.stderr
    assert rows["cuda"]["emulated"] and rows["cuda"]["selected"] and rows["cuda"]["available"]
    assert rows["cuda"]["reason"].startswith("emulated: ")
    assert rows["cuda"]["info"]["device_type"] == "cpu"
    assert not rows["cpu"]["emulated"] and not rows["cpu"]["can_emulate"]
    clash = _kvplane("platforms", "--emulate", "cuda", "--device", "cpu")
    assert clash.returncode == 2 and "different platforms" in clash.stderr


def test_console_script_lists_every_installed_platform(
    platforms_json: dict[str, dict[str, object]],
) -> None:
    assert set(platforms_json) == INSTALLED
    assert sum(bool(row["selected"]) for row in platforms_json.values()) <= 1


def test_cpu_is_available_and_selected_on_this_machine(
    platforms_json: dict[str, dict[str, object]],
) -> None:
    _require("cpu")
    cpu = platforms_json["cpu"]
    assert cpu["available"] is True and cpu["selected"] is True, cpu
    assert cpu["info"]["device_type"] == "cpu"  # type: ignore[index]


def test_cuda_is_unavailable_with_a_reason(
    platforms_json: dict[str, dict[str, object]],
) -> None:
    _require("cuda")
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    cuda = platforms_json["cuda"]
    assert cuda["available"] is False and cuda["selected"] is False
    assert isinstance(cuda["reason"], str) and cuda["reason"].strip(), cuda
    assert cuda["error"] is None, "an unavailable platform is not an error"


def test_acme_template_is_listed_available(
    platforms_json: dict[str, dict[str, object]],
) -> None:
    _require("acme")
    assert platforms_json["acme"]["available"] is True, platforms_json["acme"]


def test_console_script_table_marks_the_selection() -> None:
    _require("cpu")
    result = _kvplane("platforms")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = ["NAME", "DISTRIBUTION", "AVAILABLE", "SCORE", "DEVICES", "EMULATION", "REASON"]
    assert lines[0].split() == header
    assert any(line.startswith("*") and line.split()[1] == "cpu" for line in lines)
    assert "selected: cpu (highest score among available)" in result.stdout


def test_console_script_device_option() -> None:
    _require("cpu", "cuda")
    assert (
        "selected: cpu (requested by --device)" in _kvplane("platforms", "--device", "cpu").stdout
    )
    unavailable = _kvplane("platforms", "--device", "cuda")
    assert unavailable.returncode == 1
    assert "platform 'cuda' (--device) is not available:" in unavailable.stderr
    unknown = _kvplane("platforms", "--device", "no-such-platform")
    assert unknown.returncode == 1
    assert "no platform named 'no-such-platform' is installed" in unknown.stderr


def test_console_script_version_and_help() -> None:
    from kvplane.version import __version__

    assert _kvplane("--version").stdout.strip() == f"kvplane {__version__}"
    bare = _kvplane()
    assert bare.returncode == 2 and "platforms" in bare.stdout


# -- in-process, against fake platforms ----------------------------------------------


def test_table_shows_reasons_scores_and_errors(
    register_fake: RegisterFake, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken_probe() -> ProbeResult:
        raise RuntimeError("firmware mismatch")

    register_fake("good", ProbeResult(True, 7, "2 devices found"))
    register_fake("absent", ProbeResult(False, 0, "no absent driver"))
    register_fake("broken", broken_probe)
    assert main(["platforms"]) == 0
    out = capsys.readouterr().out
    rows = {
        line.split()[1] if line.startswith("*") else line.split()[0]: line
        for line in out.splitlines()
        if line.strip()
    }
    assert rows["good"].startswith("*") and "7" in rows["good"].split()
    assert "cpu x2" in rows["good"] and "2 devices found" in rows["good"]
    assert "no absent driver" in rows["absent"] and " no " in rows["absent"]
    assert "probe failed: RuntimeError: firmware mismatch" in rows["broken"]
    assert "errors:" in out and "(run with --verbose for full tracebacks)" in out
    assert "Traceback" not in out

    assert main(["platforms", "--verbose"]) == 0
    assert "Traceback (most recent call last)" in capsys.readouterr().out


def test_json_lists_objects_with_info(
    register_fake: RegisterFake, capsys: pytest.CaptureFixture[str]
) -> None:
    register_fake("low", ProbeResult(True, 1, ""))
    register_fake("high", ProbeResult(True, 5, ""))
    register_fake("off", ProbeResult(False, 0, "switched off"))
    assert main(["platforms", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert [rows[name]["selected"] for name in ("high", "low", "off")] == [True, False, False]
    assert rows["off"]["reason"] == "switched off" and rows["off"]["info"] is None
    assert rows["high"]["info"]["supported_dtypes"] == ["float32", "bfloat16"]
    assert rows["high"]["version"] == "in-process"

    assert main(["platforms", "--json", "--device", "low"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["low"]["selected"] and not rows["high"]["selected"]


def test_env_device_and_failure_exit_codes(
    register_fake: RegisterFake,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    register_fake("one", ProbeResult(True, 1, ""))
    register_fake("off", ProbeResult(False, 0, "switched off"))
    monkeypatch.setenv("KVPLANE_DEVICE", "off")
    assert main(["platforms"]) == 1
    assert (
        "platform 'off' (KVPLANE_DEVICE=off) is not available: switched off"
        in capsys.readouterr().err
    )
    monkeypatch.setenv("KVPLANE_DEVICE", "one")
    assert main(["platforms"]) == 0
    assert "selected: one (requested by KVPLANE_DEVICE=one)" in capsys.readouterr().out


def test_no_platform_installed(isolated_plugins: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["platforms"]) == 1
    captured = capsys.readouterr()
    assert "no kvplane platform is installed" in captured.out
    assert "no kvplane platform is available" in captured.err


def test_json_lists_quantization_methods_with_their_reasons(
    platforms_json: dict[str, dict[str, object]],
) -> None:
    info = platforms_json["cpu"]["info"]
    assert isinstance(info, dict)
    report = {(row["name"], row["reference_fallback"]): row for row in info["quantization"]}
    own = report[("fp8", False)]
    assert own["can_implement"] is True and own["reason"] == "" and own["priority"] == 0
    assert report[("fp8", True)]["priority"] < own["priority"]  # the core's, below the CPU's
    gguf = report[("gguf", False)]
    assert gguf["can_implement"] is False and "GGUF" in gguf["reason"]
    assert report[("none", False)]["can_implement"] is True
    # Mixture-of-experts experts: the torch methods run them, gguf says why it cannot.
    for name in ("fp8", "int8", "gptq", "awq"):
        assert report[(name, False)]["can_implement_experts"] is True, name
    assert gguf["can_implement_experts"] is False
    assert "no mixture-of-experts implementation" in gguf["experts_reason"]
