"""The CUDA plugin on any machine: it imports, probes without a GPU and says why."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest
import torch

from kvplane.plugins import (
    PLUGIN_API_VERSION,
    PlatformSelectionError,
    capabilities,
    hookspec,
    probe_platforms,
    select_platform,
)
from kvplane.plugins.types import GraphCaptureRequest
from kvplane_cuda import plugin, probe

HAS_CUDA = torch.cuda.is_available()


def test_import_needs_no_gpu_and_no_triton() -> None:
    code = (
        "import sys, torch\n"
        "import kvplane_cuda.plugin as plugin\n"
        "result = plugin.kvplane_platform_probe()\n"
        "assert 'triton' not in sys.modules, 'plugin.py must not import triton'\n"
        "assert not torch.cuda.is_initialized(), 'the probe must not initialise CUDA'\n"
        "print(result.available, result.reason)\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip()


def test_declares_the_api_and_implements_only_real_hooks() -> None:
    assert plugin.KVPLANE_PLUGIN_API == PLUGIN_API_VERSION
    specs = {name for name, _ in inspect.getmembers(hookspec, inspect.isfunction)}
    hooks = {name for name in dir(plugin) if name.startswith("kvplane_")}
    assert hooks <= specs
    assert {"kvplane_platform_probe", "kvplane_platform_info", "kvplane_device_memory"} <= hooks
    # Graph capture is claimed, and the runner captures exactly the requested buckets.
    assert "kvplane_graph_runner" in hooks
    assert capabilities.GRAPH_CAPTURE in plugin.kvplane_platform_info().capabilities
    runner = plugin.kvplane_graph_runner(GraphCaptureRequest(torch.device("cuda", 0), (1, 2, 4)))
    assert runner.can_run(2) and not runner.can_run(3)


@pytest.mark.skipif(HAS_CUDA, reason="this machine has a CUDA device")
def test_unavailable_here_with_a_reason() -> None:
    result = plugin.kvplane_platform_probe()
    assert not result.available and result.score == 0
    assert "CUDA" in result.reason
    with pytest.raises(PlatformSelectionError, match="not available"):
        select_platform("cuda")
    statuses = {status.name: status for status in probe_platforms()}
    if "cuda" in statuses:  # installed through its entry point
        assert not statuses["cuda"].available and statuses["cuda"].reason == result.reason
        assert not statuses["cuda"].selected
    info = plugin.kvplane_platform_info()  # does not crash without a device either
    assert info.device_count == 0 and info.distributed_backend == "nccl"


def test_reason_when_torch_has_no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None)
    result = probe.probe()
    assert not result.available and "built without CUDA" in result.reason


def test_reason_when_no_device_is_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    result = probe.probe()
    assert not result.available
    assert result.reason == "no CUDA device visible (torch.cuda.device_count() == 0)"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert "CUDA_VISIBLE_DEVICES=''" in probe.probe().reason


def test_rocm_builds_are_left_to_a_rocm_platform(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.version, "hip", "6.3")
    result = probe.probe()
    assert not result.available and "ROCm" in result.reason


def test_available_when_devices_are_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    result = probe.probe()
    assert result.available and result.score == probe.PROBE_SCORE == 100
    assert "2 CUDA device(s)" in result.reason


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_on_a_gpu_the_platform_resolves() -> None:
    platform = select_platform("cuda")
    info = platform.info
    assert info.device_type == "cuda" and info.device_count == torch.cuda.device_count()
    assert platform.has_capability(capabilities.ASYNC_EXECUTION)
    assert platform.has_capability(capabilities.GRAPH_CAPTURE)
    memory_info = platform.device_memory(0)
    assert memory_info.total_bytes > memory_info.free_bytes > 0
    from kvplane.plugins.types import KVCacheSpec, MemoryProfileRequest

    cache = platform.allocate_kv_cache(
        KVCacheSpec(4, 16, 2, 64, torch.bfloat16, torch.device("cuda", 0))
    )
    assert cache.is_cuda and cache.shape == (2, 4, 16, 2, 64)
    size = 256 * 2**20

    def run_forward() -> None:
        scratch = torch.empty(size, dtype=torch.uint8, device="cuda")
        del scratch

    profile = platform.profile_memory(MemoryProfileRequest(torch.device("cuda", 0), run_forward))
    assert profile.peak_activation_bytes >= size
    assert profile.total_bytes > profile.used_bytes > 0
