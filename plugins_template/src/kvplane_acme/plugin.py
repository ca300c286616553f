"""Acme's hook implementations: the module the entry point ``kvplane.platforms: acme``
names.

A platform starts with the three required hooks (probe, info, device memory) and its
attention backend; everything it leaves out falls back to the core's plain-torch
reference (one log line names them), so the platform works from day one and
improves hook by hook. Left to the reference here: quantization, communicator, memory
profiling, KV-cache allocation and block copies, and every op but
``silu_and_mul``. ``communication.py`` shows the next step.

Every hook here is a thin delegate to the module that does the work, named as in
kvplane's own platforms: ``probe.py`` (the probe, its score, the description),
``attention.py``, ``ops.py``, then ``memory.py``, ``communication.py`` and
``quantization.py`` as the platform grows.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from kvplane.attention.backend import AttentionBackend
from kvplane.plugins import hookimpl, types
from kvplane.plugins.host import host_memory
from kvplane_acme import probe
from kvplane_acme.attention import AcmeAttentionBackend
from kvplane_acme.ops import acme_ops

#: The plugin API this module was written for; kvplane refuses another major version.
KVPLANE_PLUGIN_API = "1.6"


@hookimpl
def kvplane_platform_probe() -> types.ProbeResult:
    return probe.probe()


@hookimpl
def kvplane_platform_info() -> types.PlatformInfo:
    return types.PlatformInfo(
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
def kvplane_device_memory(query: types.DeviceQuery) -> types.MemoryInfo:
    # An Acme device's memory is the host's here; a real plugin asks its driver.
    return host_memory(query.device_index, "acme")


@hookimpl
def kvplane_attention_backends(spec: types.AttentionSpec) -> Sequence[AttentionBackend]:
    return [AcmeAttentionBackend()]


@hookimpl
def kvplane_ops(query: types.OpsQuery) -> Mapping[str, Callable[..., Any]]:
    return acme_ops()


@hookimpl
def kvplane_emulation() -> types.Emulation:
    # How Acme runs on a machine without an Acme device (KVPLANE_EMULATE=acme). Acme's
    # "kernels" are torch on the host already, so nothing needs replacing; a real
    # vendor returns a ``plugin`` with the hooks that touch the hardware answered for
    # the host (identity, memory, communicator) and an ``activate`` that switches its
    # kernels to their emulator. See kvplane_cuda/emulation.py.
    return types.Emulation(
        description="torch on the host CPU in place of the Acme runtime",
        score=probe.PROBE_SCORE,
    )
