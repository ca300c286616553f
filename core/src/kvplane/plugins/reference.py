"""The core's built-in plugin: plain-torch fallbacks for every optional hook.

Registered in every platform's plugin manager with ``trylast=True``, so a platform's own
implementation always wins and whatever it leaves out still works.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from kvplane.attention.backend import AttentionBackend
from kvplane.attention.reference import ReferenceAttentionBackend
from kvplane.distributed.communicator import Communicator
from kvplane.distributed.torch_communicator import TorchDistributedCommunicator
from kvplane.ops import reference_ops, steps
from kvplane.plugins.host import profile_host_memory
from kvplane.plugins.markers import hookimpl
from kvplane.plugins.types import (
    AttentionSpec,
    BlockCopyRequest,
    GroupInfo,
    KVCacheSpec,
    LayerQuantSpec,
    MemoryProfile,
    MemoryProfileRequest,
    OpsQuery,
)
from kvplane.quantization.base import QuantMethod
from kvplane.quantization.fp8 import Fp8Method
from kvplane.quantization.gguf import GgufMethod
from kvplane.quantization.int8 import Int8Method
from kvplane.quantization.unquantized import UnquantizedMethod
from kvplane.quantization.w4a16 import AwqMethod, GptqMethod

#: Name under which this plugin is registered in each manager.
REFERENCE_PLUGIN_NAME = "kvplane-reference"


@hookimpl(trylast=True)
def kvplane_ops(query: OpsQuery) -> Mapping[str, Callable[..., Any]]:
    return reference_ops()


@hookimpl(trylast=True)
def kvplane_attention_backends(spec: AttentionSpec) -> Sequence[AttentionBackend]:
    return [ReferenceAttentionBackend()]


#: Below any platform's own method of the same name.
REFERENCE_QUANT_PRIORITY = -100


@hookimpl(trylast=True)
def kvplane_quant_methods(spec: LayerQuantSpec) -> Sequence[QuantMethod]:
    fallbacks: list[QuantMethod] = [
        Fp8Method(),
        Int8Method(),
        GptqMethod(),
        AwqMethod(),
        GgufMethod(),
    ]
    for method in fallbacks:
        method.priority = REFERENCE_QUANT_PRIORITY
        method.is_reference_fallback = True
    return [UnquantizedMethod(), *fallbacks]


@hookimpl(trylast=True)
def kvplane_communicator(group: GroupInfo) -> Communicator:
    return TorchDistributedCommunicator(group)


@hookimpl(trylast=True)
def kvplane_profile_memory(request: MemoryProfileRequest) -> MemoryProfile:
    # Host memory: the resident set's peak across the run is the best portable measure.
    return profile_host_memory(request)


@hookimpl(trylast=True)
def kvplane_allocate_kv_cache(spec: KVCacheSpec) -> torch.Tensor:
    # Uninitialised: attention never reads a slot before it is written, and on the host
    # the OS maps pages lazily, so an unused part of a large cache costs no memory.
    return torch.empty(spec.shape, dtype=spec.dtype, device=spec.device)


@hookimpl(trylast=True)
def kvplane_copy_blocks(request: BlockCopyRequest) -> bool:
    if len(request.src_block_ids) != len(request.dst_block_ids):
        raise ValueError(
            f"copy_blocks got {len(request.src_block_ids)} sources but "
            f"{len(request.dst_block_ids)} destinations"
        )
    if not request.src_block_ids:
        return True
    device = request.kv_caches[0].device
    src = torch.tensor(request.src_block_ids, dtype=torch.long).to(device, non_blocking=True)
    dst = torch.tensor(request.dst_block_ids, dtype=torch.long).to(device, non_blocking=True)
    for kv_cache in request.kv_caches:  # [2, num_blocks, block_size, kv_heads, head_size]
        # index_select copies every source before index_copy_ writes a destination. An
        # FP8 cache is copied as bytes (torch has no float8 index_copy_ on the CPU).
        kv_bytes = steps.byte_view(kv_cache)
        kv_bytes.index_copy_(1, dst, kv_bytes.index_select(1, src))
    return True
