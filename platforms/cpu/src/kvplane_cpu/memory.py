"""Host memory: capacity, profiling of a forward pass, KV-cache allocation, block copies."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import psutil
import torch

from kvplane.plugins.types import (
    BlockCopyRequest,
    KVCacheSpec,
    MemoryInfo,
    MemoryProfile,
    MemoryProfileRequest,
)

#: Environment variable overriding the default KV-cache size, in GiB.
KV_CACHE_GIB_ENV = "KVPLANE_CPU_KV_CACHE_GIB"
#: The default KV-cache size: this many GiB, at most a quarter of the host's memory.
DEFAULT_KV_CACHE_GIB = 4.0

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def device_memory(device_index: int) -> MemoryInfo:
    """Total and available host memory; the CPU platform has one device, index 0."""
    if device_index != 0:
        raise ValueError(f"the cpu platform has one device (index 0), not {device_index}")
    memory = psutil.virtual_memory()
    return MemoryInfo(total_bytes=memory.total, free_bytes=memory.available)


def default_kv_cache_bytes() -> int:
    """KV-cache size when the user gives none: ``KVPLANE_CPU_KV_CACHE_GIB`` if set, else
    4 GiB capped at a quarter of host memory (sizing the cache by "free device memory"
    would claim the whole machine's RAM)."""
    value = os.environ.get(KV_CACHE_GIB_ENV)
    if value is not None:
        try:
            gib = float(value)
        except ValueError:
            raise ValueError(f"{KV_CACHE_GIB_ENV}={value!r} is not a number of GiB") from None
        if gib <= 0:
            raise ValueError(f"{KV_CACHE_GIB_ENV}={value!r} must be positive")
        return int(gib * 2**30)
    return int(min(DEFAULT_KV_CACHE_GIB * 2**30, psutil.virtual_memory().total / 4))


def profile_memory(request: MemoryProfileRequest) -> MemoryProfile:
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


def allocate_kv_cache(spec: KVCacheSpec) -> torch.Tensor:
    """``torch.empty`` of ``spec.shape``: the OS maps pages lazily, so an unused part of a
    large cache costs no resident memory (the attention backend never reads unwritten
    slots)."""
    if spec.device.type != "cpu":
        raise ValueError(f"the cpu platform allocates on 'cpu', not {spec.device}")
    return torch.empty(spec.shape, dtype=spec.dtype, device=spec.device)


def copy_blocks(request: BlockCopyRequest) -> bool:
    """Copy ``src_block_ids[i]`` onto ``dst_block_ids[i]`` in every layer's cache.

    All sources are read before any destination is written, as in the reference.
    """
    if len(request.src_block_ids) != len(request.dst_block_ids):
        raise ValueError(
            f"copy_blocks got {len(request.src_block_ids)} sources but "
            f"{len(request.dst_block_ids)} destinations"
        )
    if not request.src_block_ids:
        return True
    src = torch.tensor(request.src_block_ids, dtype=torch.long)
    dst = torch.tensor(request.dst_block_ids, dtype=torch.long)
    for kv_cache in request.kv_caches:  # [2, num_blocks, block_size, kv_heads, head_size]
        kv_cache.index_copy_(1, dst, kv_cache.index_select(1, src))
    return True


def describe_host() -> str:
    """ "N CPU cores, X GiB RAM" for the probe's reason."""
    num_cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    num_cores = num_cores or os.cpu_count() or 1
    total_gib = psutil.virtual_memory().total / 2**30
    return f"{num_cores} CPU cores, {total_gib:.1f} GiB RAM, {torch.get_num_threads()} threads"
