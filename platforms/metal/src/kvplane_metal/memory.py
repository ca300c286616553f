"""Unified memory: the GPU's budget, and the profile of a forward pass.

An Apple GPU has no memory of its own: it shares the Mac's RAM with the OS and every
other process, and Metal recommends how much of it one process should keep resident on
the GPU (``recommendedMaxWorkingSetSize``, ``torch.mps.recommended_max_memory()``).
That working set, never the whole RAM, is the device's capacity here, so the KV cache
gets ``working_set * gpu_memory_utilization - weights - peak activations``.

The arithmetic is the same whether the numbers come from MPS (:class:`MpsMemory`) or,
under emulation, from the host (:class:`HostMemory`, a Mac with this host's RAM): only
the :class:`UnifiedMemorySource` differs. The KV cache is allocated and its blocks copied
by the core's reference (``torch.empty`` on the device, ``index_select`` /
``index_copy_``).
"""

from __future__ import annotations

import gc
from typing import Protocol

import psutil
import torch

from kvplane.plugins.host import profile_host_memory
from kvplane.plugins.types import MemoryInfo, MemoryProfile, MemoryProfileRequest

#: Share of RAM macOS recommends as a GPU working set where Metal cannot be asked
#: (emulation): about two thirds up to 36 GiB of RAM, three quarters above.
SMALL_MAC_WORKING_SET = 2 / 3
LARGE_MAC_WORKING_SET = 3 / 4
LARGE_MAC_RAM_BYTES = 36 << 30


class UnifiedMemorySource(Protocol):
    """Where the numbers come from: Metal through MPS, or the host under emulation."""

    def working_set_bytes(self) -> int:
        """The GPU working set this process should stay within."""
        ...

    def release_cache(self) -> None:
        """Give back what the allocator holds but no tensor uses, so it is not counted."""
        ...

    def allocated_bytes(self) -> int:
        """What this process holds on the GPU now (weights, caches, the allocator's pool)."""
        ...

    def peak_bytes_of(self, request: MemoryProfileRequest) -> int:
        """Run ``request.run_forward()`` and return the extra memory it needed at its peak."""
        ...


class MpsMemory:
    """Metal's numbers, through ``torch.mps``."""

    def working_set_bytes(self) -> int:
        return int(torch.mps.recommended_max_memory())

    def release_cache(self) -> None:
        torch.mps.synchronize()
        torch.mps.empty_cache()

    def allocated_bytes(self) -> int:
        return int(torch.mps.driver_allocated_memory())

    def peak_bytes_of(self, request: MemoryProfileRequest) -> int:
        # MPS keeps no peak statistic, but its allocator keeps freed buffers in its pool
        # until empty_cache(): after an emptied start (release_cache), the pool's growth
        # over the run is the run's peak.
        before = torch.mps.driver_allocated_memory()
        request.run_forward()
        torch.mps.synchronize()
        return max(int(torch.mps.driver_allocated_memory()) - int(before), 0)


class HostMemory:
    """A Mac with this host's RAM (emulation): macOS's working-set rule on the host's
    RAM, the process's resident set as the allocation, the core's host profiler."""

    def working_set_bytes(self) -> int:
        return recommended_working_set(psutil.virtual_memory().total)

    def release_cache(self) -> None:
        gc.collect()

    def allocated_bytes(self) -> int:
        return int(psutil.Process().memory_info().rss)

    def peak_bytes_of(self, request: MemoryProfileRequest) -> int:
        return profile_host_memory(request).peak_activation_bytes


def recommended_working_set(ram_bytes: int) -> int:
    """About what macOS recommends as a GPU working set for ``ram_bytes`` of unified
    memory (the commonly reported rule, not Apple's documented one: emulation only; a
    Mac asks Metal)."""
    share = LARGE_MAC_WORKING_SET if ram_bytes > LARGE_MAC_RAM_BYTES else SMALL_MAC_WORKING_SET
    return int(ram_bytes * share)


def device_memory(device_index: int, source: UnifiedMemorySource) -> MemoryInfo:
    """The working set as the device's capacity, less what this process holds as free."""
    if device_index != 0:
        raise ValueError(f"a Mac has one GPU (index 0), not {device_index}")
    total = source.working_set_bytes()
    return MemoryInfo(total_bytes=total, free_bytes=max(total - source.allocated_bytes(), 0))


def profile_memory(request: MemoryProfileRequest, source: UnifiedMemorySource) -> MemoryProfile:
    """The working set, what is held before the run (the weights, the allocator's idle
    pool given back first) and the run's peak: the core sizes the KV cache as
    ``total * utilization - used - peak``."""
    source.release_cache()
    used = source.allocated_bytes()
    peak = source.peak_bytes_of(request)
    return MemoryProfile(
        total_bytes=source.working_set_bytes(), used_bytes=used, peak_activation_bytes=peak
    )
