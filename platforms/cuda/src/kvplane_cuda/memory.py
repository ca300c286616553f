"""Device memory: capacity and profiling of a forward pass.

Both run after the platform is selected and may initialise CUDA. The KV cache is
allocated and its blocks copied by the core's reference (``torch.empty`` on the device,
``index_select`` / ``index_copy_``), which is what a CUDA version would do.
"""

from __future__ import annotations

import torch

from kvplane.plugins.types import MemoryInfo, MemoryProfile, MemoryProfileRequest


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
