"""Discovery: entry points, autoload switch, in-process registration, API versions and
plugins that fail to load or probe (reported, never skipped)."""

from __future__ import annotations

import logging
import re
import sys
import types
from collections.abc import Callable
from pathlib import Path

import pytest
from importlib_metadata import EntryPoint, entry_points

from kvplane.plugins import (
    ENTRY_POINT_GROUP,
    PLUGIN_API_VERSION,
    PluginAPIError,
    discover_platforms,
    discovery,
    probe_platforms,
    register_platform,
    unregister_platform,
)
from kvplane.plugins.types import ProbeResult

MakePlatform = Callable[..., types.ModuleType]  # the make_platform fixture (conftest.py)
INSTALLED = {entry_point.name: entry_point for entry_point in entry_points(group=ENTRY_POINT_GROUP)}


def _use_entry_points(monkeypatch: pytest.MonkeyPatch, *specs: tuple[str, str]) -> None:
    """Make discovery see exactly these ``(name, module)`` entry points."""
    fake = [EntryPoint(name, value, ENTRY_POINT_GROUP) for name, value in specs]
    monkeypatch.setattr(discovery, "entry_points", lambda group: fake)
    monkeypatch.delenv(discovery.DISABLE_AUTOLOAD_ENV)


# -- the installed platform packages --------------------------------------------------


@pytest.mark.parametrize("name", ["cpu", "cuda", "acme"])
def test_installed_platform_is_discovered_via_its_entry_point(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    if name not in INSTALLED:
        pytest.skip(f"no {name!r} platform package is installed")
    monkeypatch.delenv(discovery.DISABLE_AUTOLOAD_ENV)
    found = {platform.name: platform for platform in discover_platforms()}
    platform = found[name]
    assert platform.error is None, platform.error
    assert platform.module is not None
    assert platform.module.__name__ == INSTALLED[name].value
    assert platform.distribution == INSTALLED[name].dist.name
    assert platform.version == INSTALLED[name].dist.version


def test_autoload_env_turns_entry_point_loading_off(
    monkeypatch: pytest.MonkeyPatch, make_platform: MakePlatform
) -> None:
    def no_entry_points(group: str) -> list[EntryPoint]:
        raise AssertionError("entry points were read although autoload is disabled")

    monkeypatch.setattr(discovery, "entry_points", no_entry_points)
    register_platform("inproc", make_platform("inproc"))
    assert [platform.name for platform in discover_platforms()] == ["inproc"]


def test_autoload_on_reads_entry_points(
    monkeypatch: pytest.MonkeyPatch, make_platform: MakePlatform
) -> None:
    monkeypatch.setitem(sys.modules, "fake_ep_module", make_platform("viaep"))
    _use_entry_points(monkeypatch, ("viaep", "fake_ep_module"))
    (platform,) = discover_platforms()
    assert (platform.name, platform.error) == ("viaep", None)
    assert platform.module is sys.modules["fake_ep_module"]


# -- in-process registration ----------------------------------------------------------


def test_register_and_unregister_in_process(make_platform: MakePlatform) -> None:
    module = make_platform("local")
    register_platform("local", module, version="9.9")
    (platform,) = discover_platforms()
    assert (platform.name, platform.distribution, platform.version) == (
        "local",
        "(in-process)",
        "9.9",
    )
    assert platform.module is module
    unregister_platform("local")
    assert discover_platforms() == []


def test_in_process_registration_overrides_an_entry_point_of_the_same_name(
    monkeypatch: pytest.MonkeyPatch, make_platform: MakePlatform
) -> None:
    monkeypatch.setitem(sys.modules, "fake_ep_module", make_platform("dup"))
    _use_entry_points(monkeypatch, ("dup", "fake_ep_module"))
    local = make_platform("dup")
    register_platform("dup", local)
    (platform,) = discover_platforms()
    assert platform.module is local


# -- API versions ---------------------------------------------------------------------


def test_same_major_newer_minor_is_accepted(make_platform: MakePlatform) -> None:
    register_platform("newer", make_platform("newer", api="1.7"))
    assert discover_platforms()[0].error is None


def test_older_minor_is_accepted(make_platform: MakePlatform) -> None:
    # A 1.0 plugin predates the op fused_moe (1.1): it loads and gets the reference op.
    register_platform("older", make_platform("older", api="1.0"))
    assert discover_platforms()[0].error is None


def test_wrong_major_api_is_refused_with_a_clear_error(make_platform: MakePlatform) -> None:
    speaks = re.escape(PLUGIN_API_VERSION)
    with pytest.raises(
        PluginAPIError, match=rf"built for kvplane plugin API 2\.0.*speaks {speaks}"
    ):
        register_platform("future", make_platform("future", api="2.0"))
    assert discover_platforms() == []


def test_missing_api_version_is_refused(make_platform: MakePlatform) -> None:
    with pytest.raises(PluginAPIError, match="declares no KVPLANE_PLUGIN_API"):
        register_platform("unversioned", make_platform("unversioned", api=None))


def test_wrong_api_via_entry_point_is_reported_not_skipped(
    monkeypatch: pytest.MonkeyPatch, make_platform: MakePlatform
) -> None:
    monkeypatch.setitem(sys.modules, "old_plugin", make_platform("old", api="0.3"))
    monkeypatch.setitem(sys.modules, "bare_plugin", make_platform("bare", api=None))
    _use_entry_points(monkeypatch, ("old", "old_plugin"), ("bare", "bare_plugin"))
    statuses = {status.name: status for status in probe_platforms()}
    assert not statuses["old"].available
    assert "PluginAPIError" in statuses["old"].reason and "0.3" in statuses["old"].reason
    assert "declares no KVPLANE_PLUGIN_API" in (statuses["bare"].error or "")


# -- plugins that fail ----------------------------------------------------------------


def test_plugin_whose_import_fails_is_reported_with_its_error(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    make_platform: MakePlatform,
    caplog: pytest.LogCaptureFixture,
) -> None:
    (tmp_path / "exploding_plugin.py").write_text("raise RuntimeError('driver exploded')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(sys.modules, "good_plugin", make_platform("good"))
    _use_entry_points(
        monkeypatch,
        ("exploding", "exploding_plugin"),
        ("missing", "no_such_kvplane_plugin_module"),
        ("good", "good_plugin"),
    )
    with caplog.at_level(logging.ERROR, logger="kvplane.plugins.discovery"):
        found = {platform.name: platform for platform in discover_platforms()}
    assert found["exploding"].module is None
    assert found["exploding"].error == "RuntimeError: driver exploded"
    assert "ModuleNotFoundError" in (found["missing"].error or "")
    assert found["good"].error is None
    assert "driver exploded" in caplog.text and "no_such_kvplane_plugin_module" in caplog.text

    statuses = {status.name: status for status in probe_platforms()}
    assert statuses["exploding"].reason == "failed to load: RuntimeError: driver exploded"
    assert not statuses["exploding"].available and not statuses["exploding"].selected
    assert statuses["good"].selected, "a broken plugin must not stop the others"


def test_plugin_whose_probe_raises_is_reported_with_its_traceback(
    make_platform: MakePlatform, caplog: pytest.LogCaptureFixture
) -> None:
    def probe() -> ProbeResult:
        raise OSError("cannot open /dev/acme0")

    register_platform("flaky", make_platform("flaky", probe=probe))
    register_platform("steady", make_platform("steady", probe=ProbeResult(True, 1, "")))
    with caplog.at_level(logging.ERROR, logger="kvplane.plugins.selection"):
        statuses = {status.name: status for status in probe_platforms()}
    flaky = statuses["flaky"]
    assert not flaky.available and not flaky.selected
    assert flaky.reason == "probe failed: OSError: cannot open /dev/acme0"
    assert flaky.error is not None and "Traceback" in flaky.error and "in probe" in flaky.error
    assert "cannot open /dev/acme0" in caplog.text
    assert statuses["steady"].selected


def test_plugin_without_a_probe_is_unavailable_with_a_reason(make_platform: MakePlatform) -> None:
    register_platform("noprobe", make_platform("noprobe", probe=None))
    (status,) = probe_platforms()
    assert not status.available
    assert "implements no kvplane_platform_probe" in status.reason
