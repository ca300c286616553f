"""Device memory: probing, capacity, profiling of a forward pass, KV cache, block copies.

:func:`probe_cuda` runs before any platform is selected and therefore only counts
devices (through NVML where torch can); everything else runs after selection and may
initialise CUDA.
"""

from __future__ import annotations

import os

import torch

from kvplane.plugins.types import (
    BlockCopyRequest,
    KVCacheSpec,
    MemoryInfo,
    MemoryProfile,
    MemoryProfileRequest,
    ProbeResult,
)

#: Above the CPU platform's score: a visible GPU wins unless the user names another.
PROBE_SCORE = 100


def probe_cuda() -> ProbeResult:
    """Whether torch can use an NVIDIA GPU here, without creating a CUDA context."""
    if torch.version.hip is not None:
        return ProbeResult(
            False, 0, f"torch {torch.__version__} is a ROCm (HIP) build; this plugin is for CUDA"
        )
    if torch.version.cuda is None:
        return ProbeResult(
            False,
            0,
            f"torch {torch.__version__} was built without CUDA; install a CUDA build of torch",
        )
    num_devices = torch.cuda.device_count()
    if num_devices == 0:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        hint = "" if visible is None else f"; CUDA_VISIBLE_DEVICES={visible!r}"
        return ProbeResult(
            False, 0, f"no CUDA device visible (torch.cuda.device_count() == 0){hint}"
        )
    if not torch.cuda.is_available():
        return ProbeResult(
            False,
            0,
            f"{num_devices} CUDA device(s) listed but torch.cuda.is_available() is False "
            f"(driver too old for CUDA {torch.version.cuda}?)",
        )
    return ProbeResult(
        True, PROBE_SCORE, f"{num_devices} CUDA device(s), torch CUDA {torch.version.cuda}"
    )


def device_memory(device_index: int) -> MemoryInfo:
    """Total and free memory of GPU ``device_index`` as the driver reports it."""
    if not 0 <= device_index < torch.cuda.device_count():
        raise ValueError(
            f"no CUDA device {device_index}: {torch.cuda.device_count()} device(s) visible"
        )
    free, total = torch.cuda.mem_get_info(device_index)
    return MemoryInfo(total_bytes=total, free_bytes=free)


def profile_memory(request: MemoryProfileRequest) -> MemoryProfile:
    """Peak extra memory of ``request.run_forward()`` on ``request.device``.

    ``used_bytes`` is everything in use on the device before the run (weights, other
    processes, the CUDA context); the peak counts the caching allocator's peak above what
    was allocated before, plus any growth of memory outside it (cuBLAS workspaces, NCCL
    buffers) across the run.
    """
    device = request.device
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    free_before, total = torch.cuda.mem_get_info(device)
    used_before = total - free_before
    non_torch_before = used_before - torch.cuda.memory_reserved(device)
    torch.cuda.reset_peak_memory_stats(device)
    allocated_before = torch.cuda.memory_allocated(device)
    request.run_forward()
    torch.cuda.synchronize(device)
    peak_torch = torch.cuda.max_memory_allocated(device) - allocated_before
    free_after, _ = torch.cuda.mem_get_info(device)
    non_torch_after = (total - free_after) - torch.cuda.memory_reserved(device)
    return MemoryProfile(
        total_bytes=total,
        used_bytes=used_before,
        peak_activation_bytes=max(peak_torch, 0) + max(non_torch_after - non_torch_before, 0),
    )


def allocate_kv_cache(spec: KVCacheSpec) -> torch.Tensor:
    """``torch.empty`` of ``spec.shape`` on the device (the attention backend never reads
    slots that were not written)."""
    if spec.device.type != "cuda":
        raise ValueError(f"the cuda platform allocates on a 'cuda' device, not {spec.device}")
    return torch.empty(spec.shape, dtype=spec.dtype, device=spec.device)


def copy_blocks(request: BlockCopyRequest) -> bool:
    """Copy ``src_block_ids[i]`` onto ``dst_block_ids[i]`` in every layer's cache, on the
    device, reading all sources before writing (as the reference)."""
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
        kv_cache.index_copy_(1, dst, kv_cache.index_select(1, src))
    return True


def describe_devices() -> str:
    """Name and compute capability of each visible device (initialises CUDA)."""
    names = []
    for index in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(index)
        names.append(f"{torch.cuda.get_device_name(index)} (sm_{major}{minor})")
    return ", ".join(names)
