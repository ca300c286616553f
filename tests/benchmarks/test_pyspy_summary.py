"""``benchmarks/gpu/pyspy_summary.py`` on py-spy raw stacks written by hand."""

from __future__ import annotations

from pathlib import Path

from benchmarks.gpu.pyspy_summary import function_of, main, summarize

#: Frames of the hand-written stacks.
MAIN = "MainThread (0x1);<module> (/r/run.py:9)"
STEP = "step (/r/kvplane/engine/llm_engine.py:286)"
LAUNCH = "launch (/r/kvplane/engine/model_runner.py:190)"
FORWARD = "_forward (/r/kvplane/engine/model_runner.py:249)"
RAW = "\n".join(
    [
        f"{MAIN};{STEP};{LAUNCH};{FORWARD};forward (/r/kvplane/models/llama.py:140) 30",
        f"{MAIN};{STEP};{LAUNCH};{FORWARD} 10",
        f"{MAIN};{STEP};schedule (/r/kvplane/scheduler/scheduler.py:140) 60",
        "not a stack line",
    ]
)


def test_functions_drop_lines_and_folders() -> None:
    assert function_of("launch (/r/kvplane/engine/model_runner.py:190)") == (
        "launch (model_runner.py)"
    )
    assert function_of("MainThread (0x1)") == "MainThread (0x1)"


def test_whole_profile_counts_inclusive_and_self() -> None:
    summary = summarize(RAW.splitlines())
    assert summary.num_samples == 100
    assert summary.inclusive["step (llm_engine.py)"] == 100
    assert summary.inclusive["_forward (model_runner.py)"] == 40
    assert summary.self_time["schedule (scheduler.py)"] == 60
    assert summary.self_time["_forward (model_runner.py)"] == 10


def test_within_keeps_the_stacks_below_the_frame() -> None:
    summary = summarize(RAW.splitlines(), within="_forward (model_runner.py")
    assert summary.num_samples == 40
    assert summary.inclusive == {"forward (llama.py)": 30}
    assert summary.self_time == {"forward (llama.py)": 30, "(the frame itself)": 10}


def test_command_line_prints_shares(tmp_path: Path, capsys: object) -> None:
    raw = tmp_path / "engine.raw"
    raw.write_text(RAW)
    assert main([str(raw), "--within", "launch (model_runner", "--top", "3"]) == 0
    out = capsys.readouterr().out  # type: ignore[attr-defined]
    assert out.splitlines()[0] == "40 samples"
    assert " 100.0%       40  _forward (model_runner.py)" in out
