"""Selection: by name, by ``KVPLANE_DEVICE``, else the highest probe score; loud errors."""

from __future__ import annotations

import types
from collections.abc import Callable

import pytest

from kvplane.plugins import (
    Platform,
    PlatformSelectionError,
    probe_platforms,
    register_platform,
    select_platform,
)
from kvplane.plugins.selection import DEVICE_ENV
from kvplane.plugins.types import ProbeResult

MakePlatform = Callable[..., types.ModuleType]  # the make_platform fixture (conftest.py)


@pytest.fixture
def three_platforms(make_platform: MakePlatform) -> None:
    register_platform("alpha", make_platform("alpha", probe=ProbeResult(True, 10, "alpha ok")))
    register_platform("beta", make_platform("beta", probe=ProbeResult(True, 20, "beta ok")))
    register_platform(
        "gamma", make_platform("gamma", probe=ProbeResult(False, 99, "no gamma card found"))
    )


@pytest.mark.usefixtures("three_platforms")
def test_highest_available_score_wins() -> None:
    platform = select_platform()
    assert isinstance(platform, Platform)
    assert platform.name == "beta"  # gamma scores higher but is unavailable
    assert platform.info.name == "beta"
    assert platform.version == "in-process"


@pytest.mark.usefixtures("three_platforms")
def test_select_by_name_beats_score() -> None:
    assert select_platform("alpha").name == "alpha"


@pytest.mark.usefixtures("three_platforms")
def test_device_index_suffix_selects_the_platform() -> None:
    assert select_platform("alpha:1").name == "alpha"


@pytest.mark.usefixtures("three_platforms")
def test_select_by_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DEVICE_ENV, "alpha")
    assert select_platform().name == "alpha"
    # An explicit name beats the environment.
    assert select_platform("beta").name == "beta"


@pytest.mark.usefixtures("three_platforms")
def test_named_unavailable_platform_raises_with_its_reason() -> None:
    with pytest.raises(PlatformSelectionError, match="'gamma' is not available: no gamma card"):
        select_platform("gamma")


@pytest.mark.usefixtures("three_platforms")
def test_env_naming_an_unavailable_platform_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DEVICE_ENV, "gamma")
    with pytest.raises(PlatformSelectionError, match="no gamma card found"):
        select_platform()


@pytest.mark.usefixtures("three_platforms")
def test_unknown_name_raises_listing_what_was_discovered() -> None:
    with pytest.raises(PlatformSelectionError, match=r"'delta'.*alpha, beta, gamma"):
        select_platform("delta")


def test_nothing_available_raises_with_every_reason(make_platform: MakePlatform) -> None:
    register_platform("one", make_platform("one", probe=ProbeResult(False, 0, "no one here")))
    register_platform("two", make_platform("two", probe=ProbeResult(False, 0, "two is off")))
    with pytest.raises(PlatformSelectionError, match="one: no one here; two: two is off"):
        select_platform()


def test_nothing_installed_raises() -> None:
    with pytest.raises(PlatformSelectionError, match="none installed"):
        select_platform()


def test_equal_scores_are_broken_deterministically(make_platform: MakePlatform) -> None:
    for name in ("zulu", "able", "mike"):
        register_platform(name, make_platform(name, probe=ProbeResult(True, 5, "")))
    chosen = {select_platform().name for _ in range(3)}
    assert len(chosen) == 1
    assert [status.name for status in probe_platforms() if status.selected] == list(chosen)


@pytest.mark.usefixtures("three_platforms")
def test_probe_platforms_marks_the_selection() -> None:
    statuses = probe_platforms()
    assert [status.name for status in statuses] == ["alpha", "beta", "gamma"]
    assert [status.selected for status in statuses] == [False, True, False]
    gamma = statuses[2]
    assert (gamma.available, gamma.reason, gamma.score) == (False, "no gamma card found", 99)
    assert gamma.to_json()["reason"] == "no gamma card found"

    assert [status.selected for status in probe_platforms("alpha")] == [True, False, False]
    # Naming an unavailable or unknown platform selects nothing (and does not raise).
    assert not any(status.selected for status in probe_platforms("gamma"))
    assert not any(status.selected for status in probe_platforms("delta"))
