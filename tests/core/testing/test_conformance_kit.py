"""The conformance kit itself: it passes a reference-only platform and catches broken ones.

Each test installs a fake platform through a ``*.dist-info`` entry point in a temporary
directory on ``PYTHONPATH`` and runs ``pytest --pyargs kvplane.testing`` in a subprocess,
as a platform package would. ``KITDEV_BROKEN`` picks which part of the fake is broken.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

PLATFORM_SOURCE = """
import os
from dataclasses import replace

import psutil
import torch

from kvplane.attention.reference import ReferenceAttentionBackend, ReferenceAttentionImpl
from kvplane.ops import reference
from kvplane.plugins import hookimpl
from kvplane.plugins.types import MemoryInfo, PlatformInfo, ProbeResult

KVPLANE_PLUGIN_API = "1.0"
BROKEN = os.environ.get("KITDEV_BROKEN", "")


@hookimpl
def kvplane_platform_probe():
    return ProbeResult(True, 1, "fake kit platform")


@hookimpl
def kvplane_platform_info():
    return PlatformInfo("kitdev", "cpu", 1, ("float32", "bfloat16"), frozenset({"multi_device"}))


@hookimpl
def kvplane_device_memory(query):
    memory = psutil.virtual_memory()
    return MemoryInfo(memory.total, memory.available)


def off_by_one_rms_norm(x, weight, eps):
    return reference.rms_norm(x, weight + 1, eps)


def unmasked_reshape_and_cache(key, value, kv_cache, slot_mapping):
    flat = kv_cache.view(2, -1, *kv_cache.shape[-2:])
    flat[0][slot_mapping] = key.to(kv_cache.dtype)  # writes slot -1 into the last slot
    flat[1][slot_mapping] = value.to(kv_cache.dtype)


@hookimpl
def kvplane_ops(query):
    if BROKEN == "ops":
        return {"rms_norm": off_by_one_rms_norm, "reshape_and_cache": unmasked_reshape_and_cache}
    return {}


class NoWindowBackend(ReferenceAttentionBackend):
    name = "no-window"
    priority = 5

    def make_impl(self, spec):
        return ReferenceAttentionImpl(replace(spec, sliding_window=None))


@hookimpl
def kvplane_attention_backends(spec):
    return [NoWindowBackend()] if BROKEN == "attention" else []
"""


@pytest.fixture
def kit_env(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "kitdev_platform.py").write_text(PLATFORM_SOURCE)
    dist_info = tmp_path / "kitdev-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: kitdev\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text("[kvplane.platforms]\nkitdev = kitdev_platform\n")
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("KVPLANE_DEVICE", "KVPLANE_DISABLE_PLUGIN_AUTOLOAD", "PYTEST_ADDOPTS")
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH")]))
    return env


def _run_kit(
    env: dict[str, str], tmp_path: Path, selection: str, broken: str = ""
) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "pytest", "--pyargs", "kvplane.testing"]
    command += ["--kvplane-platform", "kitdev", "-k", selection, "-q", "-rfE"]
    command += ["-p", "no:cacheprovider", "--rootdir", str(tmp_path)]
    return subprocess.run(
        command,
        cwd=tmp_path,
        env=dict(env, KITDEV_BROKEN=broken),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_kit_passes_a_reference_only_platform(kit_env: dict[str, str], tmp_path: Path) -> None:
    selection = "identity or kv_cache or rms_norm or reshape or (window and float32)"
    result = _run_kit(kit_env, tmp_path, selection)
    assert result.returncode == 0, result.stdout + result.stderr
    assert " passed" in result.stdout and "failed" not in result.stdout


def test_kit_catches_broken_ops(kit_env: dict[str, str], tmp_path: Path) -> None:
    result = _run_kit(kit_env, tmp_path, "rms_norm or reshape_and_cache", broken="ops")
    assert result.returncode == 1, result.stdout + result.stderr
    failed = [line for line in result.stdout.splitlines() if line.startswith("FAILED")]
    assert any("test_rms_norm[" in line for line in failed), result.stdout
    assert any("test_reshape_and_cache[" in line for line in failed), result.stdout
    assert not any("fused_add_rms_norm" in line for line in failed), "only broken ops fail"


def test_kit_catches_an_attention_backend_ignoring_the_window(
    kit_env: dict[str, str], tmp_path: Path
) -> None:
    result = _run_kit(kit_env, tmp_path, "attention and float32 and b32", broken="attention")
    assert result.returncode == 1, result.stdout + result.stderr
    failed = [line for line in result.stdout.splitlines() if line.startswith("FAILED")]
    assert failed and all("window" in line for line in failed), result.stdout
