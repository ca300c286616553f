"""The CUDA platform's hook implementations (entry point ``kvplane.platforms: cuda``).

Thin delegates to :mod:`kvplane_cuda.probe`, :mod:`kvplane_cuda.memory`,
:mod:`kvplane_cuda.ops`, :mod:`kvplane_cuda.attention`, :mod:`kvplane_cuda.communication`,
:mod:`kvplane_cuda.graphs`, :mod:`kvplane_cuda.quantization` and
:mod:`kvplane_cuda.emulation`. Importing this module needs
torch only: no GPU, no Triton (the kernels of :mod:`kvplane_cuda.kernels` are imported
when an op table or attention layer is built), so discovery works on every machine and
the probe explains what is missing.

Left to the core's reference, which is what CUDA would run: KV-cache allocation
(``torch.empty`` on the device) and block copies (``index_select`` / ``index_copy_``).
Quantization methods CUDA does not implement itself run through the core's torch
reference (logged when chosen).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from kvplane.attention.backend import AttentionBackend
from kvplane.distributed.communicator import Communicator
from kvplane.engine.graph_runner import GraphRunner
from kvplane.plugins import capabilities, hookimpl, types
from kvplane.quantization.base import QuantMethod
from kvplane_cuda import emulation, memory, probe
from kvplane_cuda.attention import TritonAttentionBackend
from kvplane_cuda.communication import NcclCommunicator
from kvplane_cuda.graphs import CudaGraphRunner
from kvplane_cuda.ops import cuda_ops
from kvplane_cuda.quantization import cuda_quant_methods

KVPLANE_PLUGIN_API = "1.6"


@hookimpl
def kvplane_platform_probe() -> types.ProbeResult:
    return probe.probe()


@hookimpl
def kvplane_platform_info() -> types.PlatformInfo:
    available = torch.cuda.is_available()
    dtypes: tuple[str, ...] = ("float32", "float16")
    if available and torch.cuda.is_bf16_supported():
        dtypes = ("float32", "bfloat16", "float16")
    return types.PlatformInfo(
        name="cuda",
        device_type="cuda",
        device_count=torch.cuda.device_count() if available else 0,
        supported_dtypes=dtypes,
        capabilities=frozenset(
            {
                capabilities.ASYNC_EXECUTION,
                capabilities.PINNED_MEMORY,
                capabilities.MULTI_DEVICE,
                capabilities.GRAPH_CAPTURE,
            }
        ),
        distributed_backend="nccl",
        description=probe.describe() if available else "no CUDA device",
    )


@hookimpl
def kvplane_device_memory(query: types.DeviceQuery) -> types.MemoryInfo:
    return memory.device_memory(query.device_index)


@hookimpl
def kvplane_ops(query: types.OpsQuery) -> Mapping[str, Callable[..., Any]]:
    return cuda_ops() if query.device_type == "cuda" else {}


@hookimpl
def kvplane_attention_backends(spec: types.AttentionSpec) -> Sequence[AttentionBackend]:
    return [TritonAttentionBackend()]


@hookimpl
def kvplane_quant_methods(spec: types.LayerQuantSpec) -> Sequence[QuantMethod]:
    # "none" and the torch references of other methods come from the core's plugin.
    return cuda_quant_methods()


@hookimpl
def kvplane_communicator(group: types.GroupInfo) -> Communicator:
    return NcclCommunicator(group)


@hookimpl
def kvplane_profile_memory(request: types.MemoryProfileRequest) -> types.MemoryProfile:
    return memory.profile_memory(request)


@hookimpl
def kvplane_graph_runner(request: types.GraphCaptureRequest) -> GraphRunner:
    return CudaGraphRunner(request.device, request.bucket_sizes)


@hookimpl
def kvplane_emulation() -> types.Emulation:
    return emulation.emulation()
