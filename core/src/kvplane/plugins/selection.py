"""Choosing the platform: probe every discovered one, honour ``--device``, else best score.

A platform named in ``KVPLANE_EMULATE`` (or passed as ``emulate``) is probed through its
emulation (:func:`kvplane.plugins.hookspec.kvplane_emulation`) instead of its hardware
probe; without the variable nothing is emulated.
"""

from __future__ import annotations

import logging
import os
import traceback
from collections.abc import Collection
from dataclasses import dataclass, replace

from kvplane.plugins.discovery import DiscoveredPlatform, discover_platforms
from kvplane.plugins.platform import Platform, emulation, make_plugin_manager, probe
from kvplane.plugins.types import Emulation

logger = logging.getLogger(__name__)

#: Environment variable naming the platform when ``device`` is not given.
DEVICE_ENV = "KVPLANE_DEVICE"
#: Environment variable naming the platforms to emulate, comma-separated.
EMULATE_ENV = "KVPLANE_EMULATE"


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
    #: Whether this host can run the platform through its emulation.
    can_emulate: bool = False
    #: How it is emulated, or why it cannot be ("" when it has no emulation).
    emulation: str = ""
    #: Whether it is probed (and would run) through its emulation now.
    emulated: bool = False

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
            "can_emulate": self.can_emulate,
            "emulation": self.emulation,
            "emulated": self.emulated,
        }


class PlatformSelectionError(RuntimeError):
    """The requested platform does not exist or is unavailable, or none is available."""


def probe_platforms(
    device: str | None = None, emulate: Collection[str] = ()
) -> list[PlatformStatus]:
    """Probe every discovered platform and mark the one :func:`select_platform` picks.

    ``emulate`` names platforms to probe through their emulation, on top of those in
    ``KVPLANE_EMULATE``.
    """
    emulated_names = requested_emulations(emulate)
    discovered = discover_platforms()
    _warn_unknown_emulations(emulated_names, discovered)
    statuses = [_probe_one(platform, emulated_names) for platform in discovered]
    chosen = _choose(statuses, _requested_name(device), raise_errors=False)
    return [replace(status, selected=status.name == chosen) for status in statuses]


def select_platform(device: str | None = None, emulate: Collection[str] = ()) -> Platform:
    """Return the platform named by ``device`` (or ``KVPLANE_DEVICE``), else the
    available one with the highest score. Raises :class:`PlatformSelectionError` with
    the reason when the named one is missing or unavailable, or none is available.

    A platform named in ``emulate`` or ``KVPLANE_EMULATE`` is selected through its
    emulation: its emulation plugin is registered above its own module and its
    ``activate`` runs before the platform is built.
    """
    emulated_names = requested_emulations(emulate)
    discovered = {platform.name: platform for platform in discover_platforms()}
    _warn_unknown_emulations(emulated_names, discovered.values())
    statuses = [_probe_one(platform, emulated_names) for platform in discovered.values()]
    requested = _requested_name(device)
    chosen = _choose(statuses, requested, raise_errors=True)
    assert chosen is not None
    platform = discovered[chosen]
    assert platform.module is not None
    status = next(status for status in statuses if status.name == chosen)
    why = "as requested" if requested else "the highest score of the available platforms"
    logger.info(
        "platform %r (%s %s), %s: %s",
        chosen,
        platform.distribution,
        platform.version,
        why,
        status.reason,
    )
    if chosen not in emulated_names:
        return Platform(chosen, platform.version, make_plugin_manager(chosen, platform.module))
    answer = emulation(make_plugin_manager(chosen, platform.module))
    assert answer is not None and answer.available  # _choose accepted it
    if answer.activate is not None:
        answer.activate()
    manager = make_plugin_manager(chosen, platform.module, emulation_plugin=answer.plugin)
    return Platform(chosen, platform.version, manager, emulated=True)


def requested_emulations(emulate: Collection[str] = ()) -> frozenset[str]:
    """The platform names to emulate: ``emulate`` plus those in ``KVPLANE_EMULATE``."""
    from_env = os.environ.get(EMULATE_ENV, "").split(",")
    return frozenset(name.strip() for name in (*emulate, *from_env) if name.strip())


def _warn_unknown_emulations(
    names: frozenset[str], discovered: Collection[DiscoveredPlatform]
) -> None:
    known = {platform.name for platform in discovered}
    for name in sorted(names - known):
        logger.warning("%s names %r, which is not an installed platform", EMULATE_ENV, name)


def _requested_name(device: str | None) -> str | None:
    name = device or os.environ.get(DEVICE_ENV) or None
    # "cuda:1"-style names select the platform; the index is the engine's business.
    return name.split(":")[0] if name else None


def _probe_one(platform: DiscoveredPlatform, emulated_names: frozenset[str]) -> PlatformStatus:
    status = PlatformStatus(platform.name, platform.distribution, platform.version, False, "", 0)
    if platform.module is None:
        return replace(status, reason=f"failed to load: {platform.error}", error=platform.error)
    try:
        manager = make_plugin_manager(platform.name, platform.module)
        answer = emulation(manager)
        status = _with_emulation(status, answer)
        if platform.name in emulated_names:
            return _emulated(status, answer)
        result = probe(manager)
    except Exception as error:
        message = "".join(traceback.format_exception_only(type(error), error)).strip()
        logger.error("platform %r probe failed: %s", platform.name, message)
        return replace(status, reason=f"probe failed: {message}", error=traceback.format_exc())
    return replace(status, available=result.available, reason=result.reason, score=result.score)


def _with_emulation(status: PlatformStatus, answer: Emulation | None) -> PlatformStatus:
    if answer is None:
        return status
    if not answer.available:
        return replace(status, emulation=f"not here: {answer.reason}")
    return replace(status, can_emulate=True, emulation=answer.description)


def _emulated(status: PlatformStatus, answer: Emulation | None) -> PlatformStatus:
    """``status`` as probed through its emulation ``answer``."""
    if answer is not None and answer.available:
        reason = f"emulated: {answer.description}"
        return replace(status, available=True, emulated=True, reason=reason, score=answer.score)
    why = status.emulation or "it implements no kvplane_emulation hook"
    return replace(status, reason=f"asked to be emulated, but it cannot be ({why})")


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
