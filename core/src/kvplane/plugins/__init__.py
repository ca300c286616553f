"""The plugin system: hook specs, discovery, selection and the resolved platform.

Platform authors need :data:`hookimpl`, :data:`PLUGIN_API_VERSION` and the types in
:mod:`kvplane.plugins.types`; see ``docs/plugins.md``.
"""

from kvplane.plugins.discovery import (
    DiscoveredPlatform,
    PluginAPIError,
    discover_platforms,
    register_platform,
    unregister_platform,
)
from kvplane.plugins.markers import ENTRY_POINT_GROUP, PLUGIN_API_VERSION, hookimpl
from kvplane.plugins.platform import Platform
from kvplane.plugins.selection import (
    PlatformSelectionError,
    PlatformStatus,
    probe_platforms,
    select_platform,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "PLUGIN_API_VERSION",
    "DiscoveredPlatform",
    "Platform",
    "PlatformSelectionError",
    "PlatformStatus",
    "PluginAPIError",
    "discover_platforms",
    "hookimpl",
    "probe_platforms",
    "register_platform",
    "select_platform",
    "unregister_platform",
]
