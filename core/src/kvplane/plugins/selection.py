"""Choosing the platform: probe every discovered one, honour ``--device``, else best score."""

from __future__ import annotations

import logging
import os
import traceback
from dataclasses import dataclass, replace

from kvplane.plugins.discovery import DiscoveredPlatform, discover_platforms
from kvplane.plugins.platform import Platform, make_plugin_manager, probe

logger = logging.getLogger(__name__)

#: Environment variable naming the platform when ``device`` is not given.
DEVICE_ENV = "KVPLANE_DEVICE"


@dataclass(frozen=True, slots=True)
class PlatformStatus:
    """What ``kvplane platforms`` shows for one discovered platform."""

    name: str
    distribution: str
    version: str
    available: bool
    reason: str
    score: int
    selected: bool = False
    error: str | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "available": self.available,
            "reason": self.reason,
            "score": self.score,
            "selected": self.selected,
            "error": self.error,
        }


class PlatformSelectionError(RuntimeError):
    """The requested platform does not exist or is unavailable, or none is available."""


def probe_platforms(device: str | None = None) -> list[PlatformStatus]:
    """Probe every discovered platform and mark the one :func:`select_platform` picks."""
    statuses = [_probe_one(platform) for platform in discover_platforms()]
    chosen = _choose(statuses, _requested_name(device), raise_errors=False)
    return [replace(status, selected=status.name == chosen) for status in statuses]


def select_platform(device: str | None = None) -> Platform:
    """Return the platform named by ``device`` (or ``KVPLANE_DEVICE``), else the
    available one with the highest score. Raises :class:`PlatformSelectionError` with
    the reason when the named one is missing or unavailable, or none is available."""
    discovered = {platform.name: platform for platform in discover_platforms()}
    statuses = [_probe_one(platform) for platform in discovered.values()]
    chosen = _choose(statuses, _requested_name(device), raise_errors=True)
    assert chosen is not None
    platform = discovered[chosen]
    assert platform.module is not None
    logger.info("selected platform %r (%s %s)", chosen, platform.distribution, platform.version)
    return Platform(chosen, platform.version, make_plugin_manager(chosen, platform.module))


def _requested_name(device: str | None) -> str | None:
    name = device or os.environ.get(DEVICE_ENV) or None
    # "cuda:1"-style names select the platform; the index is the engine's business.
    return name.split(":")[0] if name else None


def _probe_one(platform: DiscoveredPlatform) -> PlatformStatus:
    status = PlatformStatus(platform.name, platform.distribution, platform.version, False, "", 0)
    if platform.module is None:
        return replace(status, reason=f"failed to load: {platform.error}", error=platform.error)
    try:
        result = probe(make_plugin_manager(platform.name, platform.module))
    except Exception as error:
        message = "".join(traceback.format_exception_only(type(error), error)).strip()
        logger.error("platform %r probe failed: %s", platform.name, message)
        return replace(status, reason=f"probe failed: {message}", error=traceback.format_exc())
    return replace(status, available=result.available, reason=result.reason, score=result.score)


def _choose(
    statuses: list[PlatformStatus], requested: str | None, raise_errors: bool
) -> str | None:
    if requested is not None:
        match = next((status for status in statuses if status.name == requested), None)
        if match is None:
            known = ", ".join(status.name for status in statuses) or "none"
            message = f"no platform named {requested!r} is installed (discovered: {known})"
        elif not match.available:
            message = f"platform {requested!r} is not available: {match.reason}"
        else:
            return requested
        if raise_errors:
            raise PlatformSelectionError(message)
        return None
    available = [status for status in statuses if status.available]
    if not available:
        if raise_errors:
            details = "; ".join(f"{s.name}: {s.reason}" for s in statuses) or "none installed"
            raise PlatformSelectionError(f"no kvplane platform is available ({details})")
        return None
    return max(available, key=lambda status: (status.score, status.name)).name
