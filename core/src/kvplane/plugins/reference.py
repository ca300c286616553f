"""The core's built-in plugin: plain-torch fallbacks for every optional hook.

Registered in every platform's plugin manager with ``trylast=True``, so a platform's own
implementation always wins and whatever it leaves out still works.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import psutil
import torch

from kvplane.attention.backend import AttentionBackend
from kvplane.attention.reference import ReferenceAttentionBackend
from kvplane.distributed.communicator import Communicator
from kvplane.distributed.torch_communicator import TorchDistributedCommunicator
from kvplane.engine.graph_runner import EagerGraphRunner, GraphRunner
from kvplane.ops import reference_ops
from kvplane.plugins.markers import hookimpl
from kvplane.plugins.types import (
    AttentionSpec,
    BlockCopyRequest,
    GraphCaptureRequest,
    GroupInfo,
    KVCacheSpec,
    LayerQuantSpec,
    MemoryProfile,
    MemoryProfileRequest,
    OpsQuery,
)
from kvplane.quantization.base import QuantMethod
from kvplane.quantization.unquantized import UnquantizedMethod

#: Name under which this plugin is registered in each manager.
REFERENCE_PLUGIN_NAME = "kvplane-reference"


@hookimpl(trylast=True)
def kvplane_ops(query: OpsQuery) -> Mapping[str, Callable[..., Any]]:
    return reference_ops()


@hookimpl(trylast=True)
def kvplane_attention_backends(spec: AttentionSpec) -> Sequence[AttentionBackend]:
    return [ReferenceAttentionBackend()]


@hookimpl(trylast=True)
def kvplane_quant_methods(spec: LayerQuantSpec) -> Sequence[QuantMethod]:
    return [UnquantizedMethod()]


@hookimpl(trylast=True)
def kvplane_communicator(group: GroupInfo) -> Communicator:
    return TorchDistributedCommunicator(group)


@hookimpl(trylast=True)
def kvplane_profile_memory(request: MemoryProfileRequest) -> MemoryProfile:
    # Host memory: resident set size around the run is the best portable measure.
    process = psutil.Process()
    rss_before = process.memory_info().rss
    request.run_forward()
    rss_after = process.memory_info().rss
    return MemoryProfile(
        total_bytes=psutil.virtual_memory().total,
        used_bytes=rss_before,
        peak_activation_bytes=max(rss_after - rss_before, 0),
    )


@hookimpl(trylast=True)
def kvplane_allocate_kv_cache(spec: KVCacheSpec) -> torch.Tensor:
    return torch.zeros(spec.shape, dtype=spec.dtype, device=spec.device)


@hookimpl(trylast=True)
def kvplane_copy_blocks(request: BlockCopyRequest) -> bool:
    if not request.src_block_ids:
        return True
    device = request.kv_caches[0].device
    src = torch.tensor(request.src_block_ids, dtype=torch.long, device=device)
    dst = torch.tensor(request.dst_block_ids, dtype=torch.long, device=device)
    for kv_cache in request.kv_caches:  # [2, num_blocks, block_size, kv_heads, head_size]
        kv_cache[:, dst] = kv_cache[:, src]
    return True


@hookimpl(trylast=True)
def kvplane_graph_runner(request: GraphCaptureRequest) -> GraphRunner:
    return EagerGraphRunner()
