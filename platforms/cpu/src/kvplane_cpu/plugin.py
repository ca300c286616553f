"""The CPU platform's hook implementations (entry point ``kvplane.platforms: cpu``).

Every hook of :mod:`kvplane.plugins.hookspec` is implemented here, each a thin delegate
to the module that does the work: :mod:`kvplane_cpu.memory`, :mod:`kvplane_cpu.ops`,
:mod:`kvplane_cpu.attention`, :mod:`kvplane_cpu.quantization` and
:mod:`kvplane_cpu.communication`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from kvplane.attention.backend import AttentionBackend
from kvplane.distributed.communicator import Communicator
from kvplane.engine.graph_runner import EagerGraphRunner, GraphRunner
from kvplane.plugins import capabilities, hookimpl
from kvplane.plugins.types import (
    AttentionSpec,
    BlockCopyRequest,
    DeviceQuery,
    GraphCaptureRequest,
    GroupInfo,
    KVCacheSpec,
    LayerQuantSpec,
    MemoryInfo,
    MemoryProfile,
    MemoryProfileRequest,
    OpsQuery,
    PlatformInfo,
    ProbeResult,
)
from kvplane.quantization.base import QuantMethod
from kvplane_cpu import memory
from kvplane_cpu.attention import CpuAttentionBackend
from kvplane_cpu.communication import GlooCommunicator
from kvplane_cpu.ops import cpu_ops
from kvplane_cpu.quantization import Int8WeightOnlyMethod

KVPLANE_PLUGIN_API = "1.3"

#: Below any accelerator's score: the CPU is chosen only when nothing better is there.
PROBE_SCORE = 10


@hookimpl
def kvplane_platform_probe() -> ProbeResult:
    return ProbeResult(available=True, score=PROBE_SCORE, reason=memory.describe_host())


@hookimpl
def kvplane_platform_info() -> PlatformInfo:
    return PlatformInfo(
        name="cpu",
        device_type="cpu",
        device_count=1,
        supported_dtypes=("float32", "bfloat16", "float16"),
        capabilities=frozenset({capabilities.MULTI_DEVICE}),
        distributed_backend="gloo",
        description=f"torch {torch.__version__} on the host CPU ({memory.describe_host()})",
        default_kv_cache_bytes=memory.default_kv_cache_bytes(),
    )


@hookimpl
def kvplane_device_memory(query: DeviceQuery) -> MemoryInfo:
    return memory.device_memory(query.device_index)


@hookimpl
def kvplane_ops(query: OpsQuery) -> Mapping[str, Callable[..., Any]]:
    return cpu_ops() if query.device_type == "cpu" else {}


@hookimpl
def kvplane_attention_backends(spec: AttentionSpec) -> Sequence[AttentionBackend]:
    return [CpuAttentionBackend()]


@hookimpl
def kvplane_quant_methods(spec: LayerQuantSpec) -> Sequence[QuantMethod]:
    # "none" (unquantized) comes from the core's reference plugin.
    return [Int8WeightOnlyMethod()]


@hookimpl
def kvplane_communicator(group: GroupInfo) -> Communicator:
    return GlooCommunicator(group)


@hookimpl
def kvplane_profile_memory(request: MemoryProfileRequest) -> MemoryProfile:
    return memory.profile_memory(request)


@hookimpl
def kvplane_allocate_kv_cache(spec: KVCacheSpec) -> torch.Tensor:
    return memory.allocate_kv_cache(spec)


@hookimpl
def kvplane_copy_blocks(request: BlockCopyRequest) -> bool:
    return memory.copy_blocks(request)


@hookimpl
def kvplane_graph_runner(request: GraphCaptureRequest) -> GraphRunner:
    # Nothing to capture on the CPU: every step runs eagerly.
    return EagerGraphRunner()
