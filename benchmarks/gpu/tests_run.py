"""GPU tests in subprocesses: the CUDA platform's kernel tests and the conformance kit.

Each run is its own pytest process (a crash or hang cannot stop the benchmarks) with a
JUnit XML report, from which the counts come.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any

from benchmarks.gpu.common import Suite, run_logged, tail_lines

#: pytest plugin that registers the cuda platform when it is not installed.
REGISTER_PLUGIN = "benchmarks.gpu.pytest_register_cuda"


def run_tests(suite: Suite) -> dict[str, Any]:
    if not suite.is_cuda:
        return {"skipped": "GPU tests run only with --device cuda"}
    out = suite.out_dir / "tests"
    extra = _bootstrap_plugins()
    runs = {
        "cuda_platform": ["tests/platforms/cuda", *extra["register"]],
        "conformance_kit": [
            *extra["kit"],
            *extra["register"],
            "--pyargs",
            "kvplane.testing",
            "--kvplane-platform",
            "cuda",
        ],
    }
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # real kernels on the GPU, not the interpreter
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    result: dict[str, Any] = {}
    for name, pytest_args in runs.items():
        result[name] = run_pytest(name, pytest_args, out, suite.args.tests_timeout, env)
        counts = result[name]["counts"]
        print(f"[tests] {name}: {counts} ({result[name]['seconds']:.0f} s)", flush=True)
    return result


def run_pytest(
    name: str, pytest_args: list[str], out: Path, timeout: float, env: dict[str, str]
) -> dict[str, Any]:
    junit = out / f"{name}.xml"
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        f"--junitxml={junit}",
        *pytest_args,
    ]
    run = run_logged(command, out / f"{name}.log", timeout, env)
    counts, failed = parse_junit(junit) if junit.exists() else (None, [])
    run.update({"counts": counts, "failed_tests": failed[:40]})
    if run["returncode"] != 0:
        run["tail"] = tail_lines(Path(run["log"]), 40)
    return run


def parse_junit(path: Path) -> tuple[dict[str, int], list[str]]:
    """``({tests, passed, failed, errors, skipped}, ids of failed or erroring tests)``."""
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {"tests": 0, "failed": 0, "errors": 0, "skipped": 0}
    for testsuite in suites:
        counts["tests"] += int(testsuite.get("tests", 0))
        counts["failed"] += int(testsuite.get("failures", 0))
        counts["errors"] += int(testsuite.get("errors", 0))
        counts["skipped"] += int(testsuite.get("skipped", 0))
    counts["passed"] = counts["tests"] - counts["failed"] - counts["errors"] - counts["skipped"]
    failed = [
        f"{case.get('classname')}::{case.get('name')}"
        for case in root.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    return counts, failed


def _bootstrap_plugins() -> dict[str, list[str]]:
    """``-p`` options for what an uninstalled checkout lacks: the kit's pytest plugin
    (normally a ``pytest11`` entry point) and the cuda platform's registration."""
    pytest_plugins = {ep.value for ep in importlib.metadata.entry_points(group="pytest11")}
    platforms = {ep.name for ep in importlib.metadata.entry_points(group="kvplane.platforms")}
    return {
        "kit": []
        if "kvplane.testing.pytest_plugin" in pytest_plugins
        else ["-p", "kvplane.testing.pytest_plugin"],
        "register": [] if "cuda" in platforms else ["-p", REGISTER_PLUGIN],
    }
