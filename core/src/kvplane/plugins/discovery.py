"""Finding platform plugins: entry points, API-version checks, in-process registration."""

from __future__ import annotations

import logging
import os
import traceback
from dataclasses import dataclass
from types import ModuleType

from importlib_metadata import entry_points

from kvplane.plugins.markers import ENTRY_POINT_GROUP, PLUGIN_API_VERSION

logger = logging.getLogger(__name__)

#: Set to "1" to load no platform from entry points (only ones registered in-process).
DISABLE_AUTOLOAD_ENV = "KVPLANE_DISABLE_PLUGIN_AUTOLOAD"


class PluginAPIError(RuntimeError):
    """A plugin was built for a plugin API this core does not speak."""


@dataclass(frozen=True, slots=True)
class DiscoveredPlatform:
    """One platform plugin found at discovery: its module, or the error loading it."""

    name: str
    distribution: str
    version: str
    module: ModuleType | None
    error: str | None = None


_registered: dict[str, DiscoveredPlatform] = {}


def register_platform(name: str, module: ModuleType, version: str = "in-process") -> None:
    """Register a platform module in-process (for embedding or tests), bypassing entry
    points. Raises :class:`PluginAPIError` if its API version does not match."""
    check_api_version(name, module)
    _registered[name] = DiscoveredPlatform(name, "(in-process)", version, module)


def unregister_platform(name: str) -> None:
    """Remove a platform registered with :func:`register_platform`."""
    _registered.pop(name, None)


def check_api_version(name: str, module: ModuleType) -> None:
    """Refuse a plugin whose declared ``KVPLANE_PLUGIN_API`` has another major version."""
    declared = getattr(module, "KVPLANE_PLUGIN_API", None)
    if declared is None:
        raise PluginAPIError(
            f"platform {name!r} ({module.__name__}) declares no KVPLANE_PLUGIN_API; "
            f"add KVPLANE_PLUGIN_API = {PLUGIN_API_VERSION!r} to the module"
        )
    if str(declared).split(".")[0] != PLUGIN_API_VERSION.split(".")[0]:
        raise PluginAPIError(
            f"platform {name!r} was built for kvplane plugin API {declared}, but this "
            f"kvplane-core speaks {PLUGIN_API_VERSION}; install a matching version"
        )


def discover_platforms() -> list[DiscoveredPlatform]:
    """Every platform: entry points (unless autoload is disabled) plus in-process ones.

    A plugin that fails to import or has the wrong API version is returned with its
    error (and logged), never skipped silently.
    """
    found: dict[str, DiscoveredPlatform] = {}
    if os.environ.get(DISABLE_AUTOLOAD_ENV, "") not in ("1", "true", "True"):
        for entry_point in entry_points(group=ENTRY_POINT_GROUP):
            platform = _load_entry_point(entry_point)
            if platform.name in found:
                platform = _duplicate(found[platform.name], platform)
            found[platform.name] = platform
    found.update(_registered)
    return sorted(found.values(), key=lambda platform: platform.name)


def _duplicate(first: DiscoveredPlatform, second: DiscoveredPlatform) -> DiscoveredPlatform:
    message = (
        f"platform name {first.name!r} is registered by both {first.distribution} and "
        f"{second.distribution}; uninstall one"
    )
    logger.error("%s", message)
    return DiscoveredPlatform(first.name, first.distribution, first.version, None, message)


def _load_entry_point(entry_point: object) -> DiscoveredPlatform:
    name = entry_point.name  # type: ignore[attr-defined]
    dist = getattr(entry_point, "dist", None)
    distribution = dist.name if dist is not None else "?"
    version = dist.version if dist is not None else "?"
    try:
        module = entry_point.load()  # type: ignore[attr-defined]
        check_api_version(name, module)
    except Exception as error:
        message = "".join(traceback.format_exception_only(type(error), error)).strip()
        logger.error("platform plugin %r failed to load: %s", name, message)
        logger.debug("%s", traceback.format_exc())
        return DiscoveredPlatform(name, distribution, version, None, message)
    return DiscoveredPlatform(name, distribution, version, module)
