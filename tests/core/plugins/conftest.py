"""Fixtures for the plugin-system tests: isolated discovery and fake platform modules.

Every test here runs with entry-point autoload off, no ``KVPLANE_DEVICE`` or
``KVPLANE_EMULATE`` and an empty
in-process registry, so only the fake platforms a test registers exist.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import pytest

from kvplane.plugins import discovery, hookimpl
from kvplane.plugins.selection import DEVICE_ENV, EMULATE_ENV
from kvplane.plugins.types import MemoryInfo, PlatformInfo, ProbeResult

MakePlatform = Callable[..., types.ModuleType]
FOUND = ProbeResult(True, 10, "found")


@pytest.fixture(autouse=True)
def isolated_plugins(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv(discovery.DISABLE_AUTOLOAD_ENV, "1")
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    monkeypatch.delenv(EMULATE_ENV, raising=False)
    monkeypatch.setattr(discovery, "_registered", {})
    yield


def _constant(value: object) -> Callable[[], object]:
    def hook() -> object:
        return value

    return hook


@pytest.fixture
def make_platform() -> MakePlatform:
    """Build a fake platform module.

    ``make_platform(name, api="1.0", probe=ProbeResult | callable | None, info=...,
    **hooks)``: ``probe`` and ``info`` may be values (returned by the hook) or callables
    (the hook itself); ``None`` leaves the hook out. Extra keyword arguments are hook
    implementations by hook name (plain functions; they are marked with ``hookimpl``).
    """

    def make(
        name: str,
        *,
        api: str | None = "1.0",
        probe: ProbeResult | Callable[[], Any] | None = FOUND,
        info: PlatformInfo | Callable[[], Any] | None = None,
        memory: bool = True,
        **hooks: Callable[..., Any],
    ) -> types.ModuleType:
        module = types.ModuleType(f"fake_kvplane_platform_{name}")
        if api is not None:
            module.KVPLANE_PLUGIN_API = api  # type: ignore[attr-defined]
        if info is None:
            info = PlatformInfo(name, "cpu", 1, ("float32",), frozenset(), "gloo")
        if memory:

            def kvplane_device_memory(query: object) -> MemoryInfo:
                vm = psutil.virtual_memory()
                return MemoryInfo(vm.total, vm.available)

            hooks.setdefault("kvplane_device_memory", kvplane_device_memory)
        for hook_name, value in (
            ("kvplane_platform_probe", probe),
            ("kvplane_platform_info", info),
        ):
            if value is not None:
                hooks.setdefault(hook_name, value if callable(value) else _constant(value))
        for hook_name, function in hooks.items():
            setattr(module, hook_name, hookimpl(function))
        return module

    return make
