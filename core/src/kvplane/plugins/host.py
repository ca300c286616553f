"""Host memory for platforms whose device memory is the host's RAM (CPU, emulated ones).

One implementation of "how much memory is there" and "what does a forward pass cost"
for every platform that computes on host tensors; the reference plugin uses it too.
"""

from __future__ import annotations

import gc
from pathlib import Path

import psutil

from kvplane.plugins.types import MemoryInfo, MemoryProfile, MemoryProfileRequest

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def host_memory(device_index: int, platform_name: str) -> MemoryInfo:
    """Total and available host memory, for a platform with one device (index 0)."""
    if device_index != 0:
        raise ValueError(
            f"the {platform_name} platform has one device (index 0), not {device_index}"
        )
    memory = psutil.virtual_memory()
    return MemoryInfo(total_bytes=memory.total, free_bytes=memory.available)


def profile_host_memory(request: MemoryProfileRequest) -> MemoryProfile:
    """Measure a forward pass by the process's resident set size.

    On Linux the kernel's high-water mark (``VmHWM``) is reset before the run, so the
    peak *during* the pass is measured, not just what is still resident after it;
    elsewhere the growth of RSS across the run is the estimate.
    """
    gc.collect()
    process = psutil.Process()
    rss_before = process.memory_info().rss
    can_track_peak = _reset_peak_rss()
    request.run_forward()
    rss_after = process.memory_info().rss
    peak = _peak_rss() if can_track_peak else None
    high_water = max(rss_after, peak or 0)
    return MemoryProfile(
        total_bytes=psutil.virtual_memory().total,
        used_bytes=rss_before,
        peak_activation_bytes=max(high_water - rss_before, 0),
    )


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark to the current RSS (Linux >= 4.0)."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return _peak_rss() is not None


def _peak_rss() -> int | None:
    """``VmHWM`` of this process in bytes, or ``None`` where /proc does not report it."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        return None
    return None
