"""The main server answers as its own OpenAPI schema says: schemathesis, every check.

Three bounded runs (a fixed seed, one worker, about a minute in all on two cores): the
routes that do not generate, with every phase; the two generation routes with invalid
data only (each field's boundaries: every one must be refused with a 400); and with
valid data only, fuzzed (each must be answered, as the schema says). Generation requests
are made cheap, and fields that depend on each other consistent, by
``schemathesis_hooks.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.core.server.conftest import API_KEY, ServerProcess

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[3]
GENERATION = "completions"  # both generation routes' paths end with it

RUNS = {
    "other routes": ["--exclude-path-regex", GENERATION, "--max-examples", "15"],
    "generation, invalid data": [
        *("--include-path-regex", GENERATION, "--mode", "negative"),
        *("--phases", "coverage,fuzzing", "--max-examples", "5"),
    ],
    "generation, valid data": [
        *("--include-path-regex", GENERATION, "--mode", "positive"),
        *("--phases", "examples,fuzzing", "--max-examples", "10"),
    ],
}


@pytest.mark.parametrize("options", RUNS.values(), ids=list(RUNS))
def test_the_api_matches_its_schema(
    server: ServerProcess, tmp_path: Path, options: list[str]
) -> None:
    command = [
        *(sys.executable, "-m", "schemathesis.cli", "run", server.url + "/openapi.json"),
        *("--header", f"Authorization: Bearer {API_KEY}", "--checks", "all"),
        *("--seed", "1", "--workers", "1", "--request-timeout", "60", "--no-color"),
        *options,
    ]
    pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {
        **os.environ,
        "PYTHONPATH": pythonpath,
        "SCHEMATHESIS_HOOKS": "tests.core.server.schemathesis_hooks",
    }
    # In tmp_path: schemathesis keeps its cache of failures in the working directory.
    result = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-12000:] + result.stderr[-3000:]
