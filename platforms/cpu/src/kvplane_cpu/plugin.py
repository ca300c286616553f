"""The CPU platform's hook implementations (entry point ``kvplane.platforms: cpu``).

Each hook is a thin delegate to the module that does the work: :mod:`kvplane_cpu.probe`,
:mod:`kvplane_cpu.memory`, :mod:`kvplane_cpu.ops`, :mod:`kvplane_cpu.attention`,
:mod:`kvplane_cpu.quantization` and :mod:`kvplane_cpu.communication`. Left to the core,
whose versions are what the CPU would run: memory profiling (the host's resident set,
:mod:`kvplane.plugins.host`), KV-cache allocation (``torch.empty``), block copies and
the graph runner (nothing to capture: every step runs eagerly).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from kvplane.attention.backend import AttentionBackend
from kvplane.distributed.communicator import Communicator
from kvplane.plugins import capabilities, hookimpl, types
from kvplane.plugins.host import host_memory
from kvplane.quantization.base import QuantMethod
from kvplane_cpu import memory, probe
from kvplane_cpu.attention import CpuAttentionBackend
from kvplane_cpu.communication import GlooCommunicator
from kvplane_cpu.ops import cpu_ops
from kvplane_cpu.quantization import cpu_quant_methods

KVPLANE_PLUGIN_API = "1.6"


@hookimpl
def kvplane_platform_probe() -> types.ProbeResult:
    return probe.probe()


@hookimpl
def kvplane_platform_info() -> types.PlatformInfo:
    return types.PlatformInfo(
        name="cpu",
        device_type="cpu",
        device_count=1,
        supported_dtypes=("float32", "bfloat16", "float16"),
        capabilities=frozenset({capabilities.MULTI_DEVICE}),
        distributed_backend="gloo",
        description=f"torch {torch.__version__} on the host CPU ({probe.describe()})",
        default_kv_cache_bytes=memory.default_kv_cache_bytes(),
    )


@hookimpl
def kvplane_device_memory(query: types.DeviceQuery) -> types.MemoryInfo:
    return host_memory(query.device_index, "cpu")


@hookimpl
def kvplane_ops(query: types.OpsQuery) -> Mapping[str, Callable[..., Any]]:
    return cpu_ops() if query.device_type == "cpu" else {}


@hookimpl
def kvplane_attention_backends(spec: types.AttentionSpec) -> Sequence[AttentionBackend]:
    return [CpuAttentionBackend()]


@hookimpl
def kvplane_quant_methods(spec: types.LayerQuantSpec) -> Sequence[QuantMethod]:
    # "none" (unquantized) comes from the core's reference plugin.
    return cpu_quant_methods()


@hookimpl
def kvplane_communicator(group: types.GroupInfo) -> Communicator:
    return GlooCommunicator(group)
