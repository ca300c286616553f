"""The machine: versions, device, and the two rates the roofline needs.

Bandwidth convention (stated in every result): a device-to-device copy of N bytes reads
N and writes N bytes; ``copy_read_write_GBps`` = 2N / time is the figure the roofline
uses (it is what "~3.0 TB/s copy" on our H100 means), ``copy_one_way_GBps`` = N / time
the alternative. ``read_only_GBps`` (a sum over N bytes: reads N, writes nothing) is the
like-for-like figure for kernels that mostly read, such as decode attention.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import subprocess
from typing import Any

from benchmarks.gpu.common import REPO_ROOT, Suite, free_memory, median_seconds

BANDWIDTH_CONVENTION = (
    "copy of N bytes: read_write = 2N/t (used for the roofline and as the primary "
    "reference), one_way = N/t; read_only = N/t for a sum over N bytes"
)


def run_env(suite: Suite) -> dict[str, Any]:
    result: dict[str, Any] = {"versions": versions(), "device": device_info(suite.device)}
    result["platforms"] = platform_status()
    result["memory_rates"] = memory_rates(suite)
    return result


def memory_rates(suite: Suite) -> dict[str, Any]:
    """Copy and read bandwidth and the matmul rate, measured once per run and shared."""
    if suite.memory_rates is None:
        quick = suite.args.quick
        # 2 GiB copied (4 GiB moved): far beyond the 50 MB L2, and a bf16 view of it stays
        # under 2**31 elements (32-bit indexing in the sum).
        if suite.is_cuda:
            num_bytes, size, dtype_name = 2**30 if quick else 2**31, 8192, "bfloat16"
        else:
            num_bytes, size, dtype_name = 64 * 2**20, 256, "float32"
        rates = {"convention": BANDWIDTH_CONVENTION}
        rates.update(copy_bandwidth(suite.device, num_bytes))
        rates.update(matmul_rate(suite.device, size, dtype_name))
        suite.memory_rates = rates
        free_memory(suite.device)
    return suite.memory_rates


def copy_bandwidth(device: str, num_bytes: int) -> dict[str, Any]:
    import torch

    src = torch.zeros(num_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), device, warmup=3, iters=20)
    # A sum reads the buffer (as bf16 on a GPU: 2-byte loads, float32 accumulation).
    as_words = src.view(torch.bfloat16 if device == "cuda" else torch.float32)
    read_seconds = median_seconds(lambda: as_words.sum(dtype=torch.float32), device, 3, 20)
    return {
        "copy_bytes": num_bytes,
        "copy_seconds": seconds,
        "copy_read_write_GBps": 2 * num_bytes / seconds / 1e9,
        "copy_one_way_GBps": num_bytes / seconds / 1e9,
        "read_only_GBps": num_bytes / read_seconds / 1e9,
    }


def matmul_rate(device: str, size: int, dtype_name: str) -> dict[str, Any]:
    import torch

    dtype = getattr(torch, dtype_name)
    a = torch.randn(size, size, dtype=dtype, device=device)  # [size, size]
    b = torch.randn(size, size, dtype=dtype, device=device)
    out = torch.empty(size, size, dtype=dtype, device=device)
    seconds = median_seconds(lambda: torch.mm(a, b, out=out), device, warmup=5, iters=20)
    return {
        "matmul_shape": [size, size, size],
        "matmul_dtype": dtype_name,
        "matmul_seconds": seconds,
        "matmul_TFLOPs": 2 * size**3 / seconds / 1e12,
    }


def versions() -> dict[str, Any]:
    import torch

    found: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
    }
    for module in ("triton", "transformers", "kvplane", "kvplane_cuda"):
        try:
            imported = __import__(module)
        except Exception as error:  # missing or broken: say which
            found[module] = f"not importable: {type(error).__name__}"
            continue
        found[module] = getattr(imported, "__version__", "?")
        found[f"{module}_path"] = os.path.dirname(getattr(imported, "__file__", "") or "")
    # vLLM is only located, not imported: importing it is slow and changes process state.
    spec = importlib.util.find_spec("vllm")
    found["vllm_path"] = None if spec is None else str(spec.origin)
    found["git_commit"] = _git("rev-parse", "HEAD")
    found["git_dirty_files"] = len((_git("status", "--porcelain") or "").splitlines())
    return found


def device_info(device: str) -> dict[str, Any]:
    import torch

    if device != "cuda":
        return {"type": device, "cpu_count": os.cpu_count(), "machine": platform.machine()}
    properties = torch.cuda.get_device_properties(0)
    info: dict[str, Any] = {
        "type": "cuda",
        "name": properties.name,
        "capability": f"sm_{properties.major}{properties.minor}",
        "total_memory_GiB": properties.total_memory / 2**30,
        "multiprocessors": properties.multi_processor_count,
        "device_count": torch.cuda.device_count(),
    }
    query = "name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit,pci.bus_id"
    smi = _run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"])
    if smi:
        info["nvidia_smi"] = smi.splitlines()[0]
    return info


def platform_status() -> list[dict[str, Any]]:
    from kvplane.plugins.selection import probe_platforms

    return [status.to_json() for status in probe_platforms()]


def _git(*args: str) -> str | None:
    return _run(["git", "-C", str(REPO_ROOT), *args])


def _run(command: list[str]) -> str | None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None
