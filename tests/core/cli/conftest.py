"""Fixtures for in-process CLI tests: an isolated plugin registry with fake platforms."""

from __future__ import annotations

import types
from collections.abc import Callable

import psutil
import pytest

from kvplane.plugins import discovery, hookimpl, register_platform
from kvplane.plugins.selection import DEVICE_ENV, EMULATE_ENV
from kvplane.plugins.types import MemoryInfo, PlatformInfo, ProbeResult


@pytest.fixture
def isolated_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    """No entry points, no ``KVPLANE_DEVICE`` or ``KVPLANE_EMULATE``, an empty in-process
    registry."""
    monkeypatch.setenv(discovery.DISABLE_AUTOLOAD_ENV, "1")
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    monkeypatch.delenv(EMULATE_ENV, raising=False)
    monkeypatch.setattr(discovery, "_registered", {})


@pytest.fixture
def register_fake(isolated_plugins: None) -> Callable[..., None]:
    """``register_fake(name, probe)``: register a minimal platform whose probe returns
    ``probe`` (a ProbeResult) or calls it (a function)."""

    def register(name: str, probe: ProbeResult | Callable[[], ProbeResult]) -> None:
        module = types.ModuleType(f"fake_cli_platform_{name}")
        module.KVPLANE_PLUGIN_API = "1.0"  # type: ignore[attr-defined]
        module.kvplane_platform_probe = hookimpl(  # type: ignore[attr-defined]
            probe if callable(probe) else lambda: probe
        )
        module.kvplane_platform_info = hookimpl(  # type: ignore[attr-defined]
            lambda: PlatformInfo(name, "cpu", 2, ("float32", "bfloat16"), frozenset({"x"}))
        )
        module.kvplane_device_memory = hookimpl(  # type: ignore[attr-defined]
            lambda query: MemoryInfo(psutil.virtual_memory().total, 1)
        )
        register_platform(name, module)

    return register
