"""Acme's hook implementations: the module the entry point ``kvplane.platforms: acme``
names.

A platform starts with the three required hooks (probe, info, device memory) and its
attention backend; everything it leaves out falls back to the core's plain-torch
reference, with one log line per hook or op, so the platform works from day one and
improves hook by hook. Left to the reference here: quantization, communicator, memory
profiling, KV-cache allocation and block copies, graph capture, and every op but
``silu_and_mul``. ``communication.py`` shows the next step.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import psutil

from kvplane.attention.backend import AttentionBackend
from kvplane.plugins import hookimpl
from kvplane.plugins.types import (
    AttentionSpec,
    DeviceQuery,
    MemoryInfo,
    OpsQuery,
    PlatformInfo,
    ProbeResult,
)
from kvplane_acme.attention import AcmeAttentionBackend
from kvplane_acme.ops import acme_ops

#: The plugin API this module was written for; kvplane refuses another major version.
KVPLANE_PLUGIN_API = "1.0"

#: Set to "0" to make the probe report Acme unavailable (stands in for "no driver").
AVAILABLE_ENV = "KVPLANE_ACME_AVAILABLE"

#: Highest available score wins when the user names no platform. The CPU platform
#: scores 10 and CUDA 100; this example scores below the CPU so it is only used when
#: asked for (``--device acme``). A real accelerator scores above the CPU.
PROBE_SCORE = 5


@hookimpl
def kvplane_platform_probe() -> ProbeResult:
    # Cheap and side-effect free: a real plugin asks its driver whether a device exists.
    if os.environ.get(AVAILABLE_ENV, "1") == "0":
        return ProbeResult(
            available=False,
            reason=f"Acme driver not found ({AVAILABLE_ENV}=0 simulates a machine without it)",
        )
    return ProbeResult(available=True, score=PROBE_SCORE, reason="1 Acme device (simulated)")


@hookimpl
def kvplane_platform_info() -> PlatformInfo:
    return PlatformInfo(
        name="acme",
        device_type="cpu",  # the torch device Acme tensors live on
        device_count=1,
        supported_dtypes=("float32", "bfloat16"),
        capabilities=frozenset(),  # flags from kvplane.plugins.capabilities, once earned
        distributed_backend="gloo",
        description="Acme example accelerator (torch on the host CPU)",
        # Host memory is not a device's: size the KV cache explicitly, don't profile.
        default_kv_cache_bytes=1 << 30,
    )


@hookimpl
def kvplane_device_memory(query: DeviceQuery) -> MemoryInfo:
    if query.device_index != 0:
        raise ValueError(f"Acme has one device (index 0), not {query.device_index}")
    memory = psutil.virtual_memory()
    return MemoryInfo(total_bytes=memory.total, free_bytes=memory.available)


@hookimpl
def kvplane_attention_backends(spec: AttentionSpec) -> Sequence[AttentionBackend]:
    return [AcmeAttentionBackend()]


@hookimpl
def kvplane_ops(query: OpsQuery) -> Mapping[str, Callable[..., Any]]:
    return acme_ops()
