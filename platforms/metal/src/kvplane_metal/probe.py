"""Whether this machine can run the Metal platform (torch's MPS backend), and what it has.

:func:`probe` runs before any platform is selected: it reads the OS, torch's build and
``torch.backends.mps.is_available()``, and allocates nothing on the GPU. Each check
that fails gives its own reason, in the order a user would fix them.
"""

from __future__ import annotations

import platform
import subprocess

import psutil
import torch

from kvplane.plugins.types import ProbeResult

#: Above the CPU platform's score: an Apple GPU wins on a Mac unless the user names another.
PROBE_SCORE = 90
#: The first macOS whose MPS backend torch supports.
MIN_MACOS = (12, 3)
#: The first macOS whose MPS backend has bfloat16.
BFLOAT16_MACOS = (14, 0)


def probe() -> ProbeResult:
    """Available when torch can use the Apple GPU; otherwise the first thing missing."""
    reason = unavailable_reason()
    if reason is not None:
        return ProbeResult(False, 0, reason)
    return ProbeResult(True, PROBE_SCORE, describe())


def unavailable_reason() -> str | None:
    """Why MPS cannot be used here ("not macOS", "torch built without MPS", "macOS too
    old", ...), or ``None`` when it can."""
    system = platform.system()
    if system != "Darwin":
        return f"not macOS (this is {system or 'an unknown OS'}): Metal needs an Apple-silicon Mac"
    if not torch.backends.mps.is_built():
        return (
            f"torch {torch.__version__} was built without MPS; install the macOS arm64 "
            "build of torch (pip install torch)"
        )
    version = macos_version()
    if version is not None and version < MIN_MACOS:
        return (
            f"macOS {_dotted(version)} is too old: torch's MPS backend needs macOS "
            f"{_dotted(MIN_MACOS)} or newer"
        )
    if not torch.backends.mps.is_available():
        return (
            "torch has MPS but torch.backends.mps.is_available() is False (an Intel Mac, "
            "or Python running under Rosetta?)"
        )
    return None


def macos_version() -> tuple[int, ...] | None:
    """macOS's version as ints (``(14, 5)``), or ``None`` when it cannot be read."""
    release = platform.mac_ver()[0]
    try:
        return tuple(int(part) for part in release.split(".")) if release else None
    except ValueError:
        return None


def has_bfloat16() -> bool:
    """Whether MPS computes in bfloat16 here (macOS 14 and newer)."""
    version = macos_version()
    return version is not None and version >= BFLOAT16_MACOS


def chip_name() -> str | None:
    """The chip ("Apple M2 Pro") from ``sysctl``, or ``None`` where it cannot be read."""
    try:
        completed = subprocess.run(
            ["sysctl", "-n", "machdep.cpu.brand_string"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    name = completed.stdout.strip()
    return name or None


def gpu_working_set_bytes() -> int | None:
    """What Metal recommends this process keep on the GPU (its share of unified
    memory), or ``None`` where torch cannot say."""
    try:
        return int(torch.mps.recommended_max_memory())
    except (AttributeError, RuntimeError):
        return None


def describe() -> str:
    """ "Apple M2 Pro, macOS 14.5, GPU working set 21.3 GiB of 32.0 GiB unified memory",
    with the parts that can be read."""
    parts = [chip_name() or "Apple GPU"]
    version = macos_version()
    if version is not None:
        parts.append(f"macOS {_dotted(version)}")
    working_set = gpu_working_set_bytes()
    ram = psutil.virtual_memory().total / 2**30
    if working_set is not None:
        parts.append(
            f"GPU working set {working_set / 2**30:.1f} GiB of {ram:.1f} GiB unified memory"
        )
    return ", ".join(parts)


def _dotted(version: tuple[int, ...]) -> str:
    return ".".join(str(part) for part in version)
