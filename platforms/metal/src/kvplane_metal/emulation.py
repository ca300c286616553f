"""Emulated Metal: the platform's own code on host tensors, for hosts without a Mac.

Selected with ``KVPLANE_EMULATE=metal`` (or ``--emulate metal``). The hooks below are
registered above :mod:`kvplane_metal.plugin` and answer only where the hardware is
missing: tensors live on the host (``device_type="cpu"``) and the memory numbers come
from the host (:class:`~kvplane_metal.memory.HostMemory`: a Mac with this host's RAM)
through the same budgeting code. Everything else is Metal's own: the op table
(:func:`~kvplane_metal.ops.metal_ops`), the torch attention path
(:class:`~kvplane_metal.attention.MetalTorchAttentionBackend`; the attention hook offers
the Metal kernel only where it compiles, which it never does here) and the gloo
communicator.

What only a Mac can verify: the Metal kernel (compilation and results), MPS's own
kernels behind the torch calls (float16 and bfloat16 rounding, ops MPS lacks), Metal's
working-set numbers, and speed.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any

import torch

from kvplane.plugins import hookimpl
from kvplane.plugins.capabilities import MULTI_DEVICE
from kvplane.plugins.types import (
    DeviceQuery,
    Emulation,
    MemoryInfo,
    MemoryProfile,
    MemoryProfileRequest,
    OpsQuery,
    PlatformInfo,
)
from kvplane_metal import memory
from kvplane_metal.ops import metal_ops
from kvplane_metal.probe import PROBE_SCORE

DESCRIPTION = "Metal's torch path (ops, paged attention, memory budget) on host tensors"
#: KV cache when neither a size nor profiling is asked for: tests run small shapes.
KV_CACHE_BYTES = 256 << 20


def emulation() -> Emulation:
    """The answer of :func:`kvplane_metal.plugin.kvplane_emulation`: always possible."""
    return Emulation(DESCRIPTION, score=PROBE_SCORE, plugin=sys.modules[__name__])


# --------------------------------------------------------------------------------------
# Hooks that differ without the hardware (registered above kvplane_metal.plugin)
# --------------------------------------------------------------------------------------


@hookimpl
def kvplane_platform_info() -> PlatformInfo:
    return PlatformInfo(
        name="metal",
        device_type="cpu",
        device_count=1,
        # A Mac on macOS 14 or newer, where MPS has bfloat16.
        supported_dtypes=("float16", "float32", "bfloat16"),
        # As on a Mac: no graphs, no pinned staging; processes over gloo.
        capabilities=frozenset({MULTI_DEVICE}),
        distributed_backend="gloo",
        description=f"emulated: {DESCRIPTION} (torch {torch.__version__})",
        default_kv_cache_bytes=KV_CACHE_BYTES,
    )


@hookimpl
def kvplane_device_memory(query: DeviceQuery) -> MemoryInfo:
    return memory.device_memory(query.device_index, memory.HostMemory())


@hookimpl
def kvplane_ops(query: OpsQuery) -> Mapping[str, Callable[..., Any]]:
    return metal_ops()


@hookimpl
def kvplane_profile_memory(request: MemoryProfileRequest) -> MemoryProfile:
    return memory.profile_memory(request, memory.HostMemory())
