"""Building in-process platform modules for tests (what an entry point would load)."""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

from kvplane.plugins.markers import PLUGIN_API_VERSION


def platform_module(
    name: str, *hooks: Callable[..., Any], api: str = PLUGIN_API_VERSION
) -> types.ModuleType:
    """A module declaring plugin API ``api`` whose attributes are ``hooks`` (functions
    decorated with ``kvplane.plugins.hookimpl``, named like the hook specs), ready for
    ``kvplane.plugins.register_platform``."""
    module = types.ModuleType(name)
    module.KVPLANE_PLUGIN_API = api  # type: ignore[attr-defined]
    for hook in hooks:
        setattr(module, hook.__name__, hook)
    return module
