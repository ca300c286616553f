"""The Metal platform's hook implementations (entry point ``kvplane.platforms: metal``).

Thin delegates to :mod:`kvplane_metal.probe`, :mod:`kvplane_metal.memory`,
:mod:`kvplane_metal.ops`, :mod:`kvplane_metal.attention`,
:mod:`kvplane_metal.communication` and :mod:`kvplane_metal.emulation`. Importing this
module needs torch only and touches no GPU, so discovery works on every machine and the
probe explains what is missing.

Left to the core's reference, which is what MPS would run: KV-cache allocation
(``torch.empty`` on ``mps``), block copies, quantization methods (torch, logged as
fallbacks) and the graph runner (nothing is captured: every step runs eagerly).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from kvplane.attention.backend import AttentionBackend
from kvplane.distributed.communicator import Communicator
from kvplane.plugins import hookimpl, types
from kvplane.plugins.capabilities import MULTI_DEVICE
from kvplane_metal import emulation, memory, probe
from kvplane_metal.attention import MetalShaderAttentionBackend, MetalTorchAttentionBackend
from kvplane_metal.communication import MetalGlooCommunicator
from kvplane_metal.ops import metal_ops

KVPLANE_PLUGIN_API = "1.6"


@hookimpl
def kvplane_platform_probe() -> types.ProbeResult:
    return probe.probe()


@hookimpl
def kvplane_platform_info() -> types.PlatformInfo:
    available = probe.unavailable_reason() is None
    # float16 first: bfloat16 only where MPS has it (macOS 14+).
    dtypes: tuple[str, ...] = ("float16", "float32")
    if available and probe.has_bfloat16():
        dtypes = ("float16", "float32", "bfloat16")
    return types.PlatformInfo(
        name="metal",
        device_type="mps",
        device_count=1 if available else 0,
        supported_dtypes=dtypes,
        # No CUDA-style graphs and no pinned staging on MPS: unified memory needs none.
        capabilities=frozenset({MULTI_DEVICE}),
        distributed_backend="gloo",
        description=probe.describe() if available else "no Apple GPU",
    )


@hookimpl
def kvplane_device_memory(query: types.DeviceQuery) -> types.MemoryInfo:
    return memory.device_memory(query.device_index, memory.MpsMemory())


@hookimpl
def kvplane_profile_memory(request: types.MemoryProfileRequest) -> types.MemoryProfile:
    return memory.profile_memory(request, memory.MpsMemory())


@hookimpl
def kvplane_ops(query: types.OpsQuery) -> Mapping[str, Callable[..., Any]]:
    return metal_ops() if query.device_type == "mps" else {}


@hookimpl
def kvplane_attention_backends(spec: types.AttentionSpec) -> Sequence[AttentionBackend]:
    from kvplane_metal.kernels import paged_decode

    torch_path = MetalTorchAttentionBackend()
    if paged_decode.unavailable_reason() is not None:
        return [torch_path]
    return [MetalShaderAttentionBackend(), torch_path]


@hookimpl
def kvplane_communicator(group: types.GroupInfo) -> Communicator:
    return MetalGlooCommunicator(group)


@hookimpl
def kvplane_emulation() -> types.Emulation:
    return emulation.emulation()
