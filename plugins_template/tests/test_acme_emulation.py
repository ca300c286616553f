"""Acme's emulation: selectable without the device only when the user asks for it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kvplane.plugins import (
    PlatformSelectionError,
    register_platform,
    select_platform,
    unregister_platform,
)
from kvplane.plugins.selection import EMULATE_ENV
from kvplane_acme import plugin, probe


@pytest.fixture(autouse=True)
def acme_without_its_device(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    register_platform("acme", plugin)
    monkeypatch.setenv(probe.AVAILABLE_ENV, "0")
    monkeypatch.delenv(EMULATE_ENV, raising=False)
    yield
    unregister_platform("acme")


def test_unavailable_without_emulation() -> None:
    with pytest.raises(PlatformSelectionError, match="Acme driver not found"):
        select_platform("acme")


def test_emulated_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(EMULATE_ENV, "acme")
    platform = select_platform("acme")
    assert platform.emulated and platform.info.name == "acme"
    assert select_platform("acme", emulate=("acme",)).emulated
