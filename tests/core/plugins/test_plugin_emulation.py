"""Emulation: a platform without its hardware becomes selectable only when asked for."""

from __future__ import annotations

import types
from collections.abc import Callable

import pytest

from kvplane.config import EngineConfig
from kvplane.plugins import (
    PlatformSelectionError,
    hookimpl,
    probe_platforms,
    register_platform,
    select_platform,
)
from kvplane.plugins.selection import EMULATE_ENV
from kvplane.plugins.types import Emulation, OpsQuery, PlatformInfo, ProbeResult

MakePlatform = Callable[..., types.ModuleType]  # the make_platform fixture (conftest.py)
NO_CARD = ProbeResult(False, 0, "no zeta card found")


class ZetaEmulation:
    """An emulation plugin: answers the hooks that differ without the hardware."""

    def __init__(self) -> None:
        self.num_activations = 0

    @hookimpl
    def kvplane_platform_info(self) -> PlatformInfo:
        return PlatformInfo("zeta", "cpu", 1, ("float32",), frozenset(), "gloo", "emulated")

    @hookimpl
    def kvplane_ops(self, query: OpsQuery) -> dict[str, object]:
        return {"silu_and_mul": emulated_silu_and_mul}

    def activate(self) -> None:
        self.num_activations += 1

    def answer(self) -> Emulation:
        return Emulation("zeta kernels on the host", score=50, plugin=self, activate=self.activate)


def emulated_silu_and_mul(x: object) -> object:
    raise AssertionError("only its identity is compared")


@pytest.fixture
def zeta(make_platform: MakePlatform) -> ZetaEmulation:
    """A platform whose hardware is missing, with an emulation; and a plain cpu one."""
    emulation = ZetaEmulation()

    def kvplane_emulation() -> Emulation:
        return emulation.answer()

    register_platform(
        "zeta", make_platform("zeta", api="1.4", probe=NO_CARD, kvplane_emulation=kvplane_emulation)
    )
    register_platform("plain", make_platform("plain", probe=ProbeResult(True, 10, "here")))
    return emulation


def test_without_the_variable_nothing_changes(zeta: ZetaEmulation) -> None:
    statuses = {status.name: status for status in probe_platforms()}
    assert not statuses["zeta"].available
    assert statuses["zeta"].reason == NO_CARD.reason
    assert statuses["zeta"].can_emulate and not statuses["zeta"].emulated
    assert statuses["zeta"].emulation == "zeta kernels on the host"
    assert not statuses["plain"].can_emulate and statuses["plain"].emulation == ""
    with pytest.raises(PlatformSelectionError, match="no zeta card found"):
        select_platform("zeta")
    assert select_platform().name == "plain"
    assert zeta.num_activations == 0


def test_env_makes_it_selectable_through_its_plugin(
    zeta: ZetaEmulation, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(EMULATE_ENV, "zeta")
    status = next(status for status in probe_platforms() if status.name == "zeta")
    assert status.available and status.emulated and status.selected  # score 50 > 10
    assert status.reason == "emulated: zeta kernels on the host"
    platform = select_platform("zeta")
    assert platform.emulated and platform.info.description == "emulated"
    assert platform.ops.silu_and_mul is emulated_silu_and_mul  # the plugin's op wins
    assert zeta.num_activations == 1


def test_emulate_argument_and_engine_config(zeta: ZetaEmulation) -> None:
    assert select_platform("zeta", emulate=("zeta",)).emulated
    assert not select_platform("plain", emulate=("zeta",)).emulated
    with pytest.raises(ValueError, match="names another"):
        EngineConfig(device="cpu", emulate="zeta")
    assert EngineConfig(device="zeta:0", emulate="zeta").emulate == "zeta"


def test_a_platform_without_emulation_stays_unavailable(
    zeta: ZetaEmulation, make_platform: MakePlatform, monkeypatch: pytest.MonkeyPatch
) -> None:
    register_platform("eta", make_platform("eta", probe=NO_CARD))
    monkeypatch.setenv(EMULATE_ENV, "eta, zeta")
    statuses = {status.name: status for status in probe_platforms()}
    assert not statuses["eta"].available
    assert "implements no kvplane_emulation" in statuses["eta"].reason
    assert statuses["zeta"].emulated


def test_emulation_missing_on_this_host_says_why(
    make_platform: MakePlatform, monkeypatch: pytest.MonkeyPatch
) -> None:
    def kvplane_emulation() -> Emulation:
        return Emulation("interpreted", available=False, reason="pip install theta-sim")

    register_platform(
        "theta", make_platform("theta", probe=NO_CARD, kvplane_emulation=kvplane_emulation)
    )
    status = probe_platforms()[0]
    assert not status.can_emulate and status.emulation == "not here: pip install theta-sim"
    monkeypatch.setenv(EMULATE_ENV, "theta")
    with pytest.raises(PlatformSelectionError, match="pip install theta-sim"):
        select_platform("theta")
