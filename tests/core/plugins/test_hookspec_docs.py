"""The hook specs are the contract: every one documented in full, and docs/plugins.md's
hook table generated from them."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path

import pytest

from kvplane.plugins import hookspec, spec_table
from kvplane.plugins.markers import PLUGIN_API_VERSION
from kvplane.plugins.platform import REQUIRED_HOOKS

PLUGINS_PAGE = Path(__file__).resolve().parents[3] / "docs" / "plugins.md"
SPECS = spec_table.hook_specs()


@pytest.mark.parametrize("spec", SPECS, ids=lambda spec: spec.__name__)
def test_every_spec_follows_the_template(spec: Callable[..., object]) -> None:
    hook = spec_table.parse_hook(spec)
    doc = inspect.getdoc(spec) or ""
    assert hook.summary and hook.when_called.startswith("Called"), doc
    assert set(hook.params) == set(inspect.signature(spec).parameters)
    assert hook.returns
    assert hook.implemented_by
    assert hook.version_added and _version(hook.version_added) <= _version(PLUGIN_API_VERSION)
    if hook.first_result:
        assert "Stops at first non-None result." in doc
        assert spec.__annotations__["return"].endswith("| None"), "None is allowed"
    else:
        assert "Results of all implementations are merged." in doc


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def test_required_hooks_are_the_ones_documented_as_required() -> None:
    documented = {spec.__name__ for spec in SPECS if spec_table.parse_hook(spec).is_required}
    assert documented == set(REQUIRED_HOOKS)


def test_docs_hook_table_is_generated_from_the_specs() -> None:
    page = PLUGINS_PAGE.read_text()
    assert spec_table.replace_table(page) == page, (
        "docs/plugins.md's hook table is stale: run "
        "`python -m kvplane.plugins.spec_table docs/plugins.md`"
    )


def test_api_history_names_the_current_version() -> None:
    assert f"**{PLUGIN_API_VERSION}**" in (hookspec.__doc__ or "")


def test_every_shipped_plugin_and_page_names_the_current_api() -> None:
    """One source of truth: the core's version is what our platforms, the template and
    the pages that tell authors what to declare say."""
    import importlib

    root = PLUGINS_PAGE.parents[1]
    declaration = f'KVPLANE_PLUGIN_API = "{PLUGIN_API_VERSION}"'
    for module_name in ("kvplane_cpu.plugin", "kvplane_cuda.plugin", "kvplane_acme.plugin"):
        module = importlib.import_module(module_name)
        assert module.KVPLANE_PLUGIN_API == PLUGIN_API_VERSION, module_name
    for page in (PLUGINS_PAGE, root / "plugins_template" / "README.md"):
        assert declaration in page.read_text(), page
