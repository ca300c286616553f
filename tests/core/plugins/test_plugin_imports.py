"""Every module the plugin package depends on imports first, on its own (no cycles).

``kvplane.plugins`` imports the attention, quantization and communication interfaces, so
those must not import ``kvplane.plugins`` at run time. Each case uses a fresh interpreter:
within this one the modules are already loaded.
"""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "module",
    [
        "kvplane.attention",
        "kvplane.attention.reference",
        "kvplane.quantization",
        "kvplane.quantization.unquantized",
        "kvplane.distributed",
        "kvplane.plugins",
    ],
)
def test_module_imports_first(module: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
