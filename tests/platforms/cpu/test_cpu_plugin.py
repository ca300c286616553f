"""The CPU plugin's hooks: identity, selection, memory, KV cache, the resolved objects."""

from __future__ import annotations

import inspect
import mmap
from pathlib import Path

import pytest
import torch

from kvplane.plugins import PLUGIN_API_VERSION, capabilities, hookspec, select_platform
from kvplane.plugins.types import (
    BlockCopyRequest,
    DeviceQuery,
    GraphCaptureRequest,
    GroupInfo,
    KVCacheSpec,
    MemoryProfileRequest,
)
from kvplane_cpu import memory, ops, plugin, probe
from kvplane_cpu.communication import GlooCommunicator

#: Hooks the CPU leaves to the core's reference, whose versions are what it would run.
REFERENCE_HOOKS = {"kvplane_profile_memory", "kvplane_allocate_kv_cache", "kvplane_copy_blocks"}
#: Hooks the engine never calls for the CPU (it lists no ``capabilities.GRAPH_CAPTURE``)
#: or that it has no use for (a host platform needs no emulation).
UNCALLED_HOOKS = {"kvplane_graph_runner", "kvplane_emulation"}


def test_declares_the_api_and_implements_every_other_hook() -> None:
    assert plugin.KVPLANE_PLUGIN_API == PLUGIN_API_VERSION
    specs = {name for name, _ in inspect.getmembers(hookspec, inspect.isfunction)}
    specs = {name for name in specs if name.startswith("kvplane_")}
    hooks = {name for name in dir(plugin) if name.startswith("kvplane_")}
    assert hooks <= specs
    assert specs - REFERENCE_HOOKS - UNCALLED_HOOKS <= hooks
    assert not hooks & REFERENCE_HOOKS


def test_probe_is_available_with_what_it_found() -> None:
    result = plugin.kvplane_platform_probe()
    assert result.available and result.score == probe.PROBE_SCORE
    assert "CPU cores" in result.reason and "GiB RAM" in result.reason


def test_selected_platform_resolves_to_this_plugin() -> None:
    platform = select_platform("cpu")
    assert platform.info.name == "cpu" and platform.info.device_type == "cpu"
    assert platform.info.distributed_backend == "gloo"
    assert platform.has_capability(capabilities.MULTI_DEVICE)
    assert platform.supports_dtype(torch.bfloat16)
    assert platform.device(0) == torch.device("cpu", 0)
    for name, op in ops.cpu_ops().items():
        assert getattr(platform.ops, name) is op
    assert not platform.has_capability(capabilities.GRAPH_CAPTURE)
    assert platform.graph_runner(GraphCaptureRequest(torch.device("cpu"))) is None
    group = GroupInfo(None, 0, 1, torch.device("cpu"))
    assert isinstance(platform.communicator(group), GlooCommunicator)


def test_device_memory() -> None:
    info = plugin.kvplane_device_memory(query=DeviceQuery(0))
    assert info.total_bytes >= info.free_bytes > 0
    with pytest.raises(ValueError, match="one device"):
        plugin.kvplane_device_memory(query=DeviceQuery(1))


def test_default_kv_cache_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(memory.KV_CACHE_GIB_ENV, raising=False)
    default = plugin.kvplane_platform_info().default_kv_cache_bytes
    assert default is not None and 0 < default <= 4 * 2**30
    monkeypatch.setenv(memory.KV_CACHE_GIB_ENV, "0.5")
    assert plugin.kvplane_platform_info().default_kv_cache_bytes == 2**29
    monkeypatch.setenv(memory.KV_CACHE_GIB_ENV, "lots")
    with pytest.raises(ValueError, match="GiB"):
        memory.default_kv_cache_bytes()


def test_allocate_kv_cache() -> None:
    spec = KVCacheSpec(5, 16, 2, 8, torch.bfloat16, torch.device("cpu"))
    cache = select_platform("cpu").allocate_kv_cache(spec)
    assert cache.shape == spec.shape and cache.dtype == torch.bfloat16


def test_copy_blocks_reads_every_source_first(generator: torch.Generator) -> None:
    caches = tuple(torch.randn(2, 6, 4, 2, 8, generator=generator) for _ in range(2))
    expected = tuple(cache.clone() for cache in caches)
    for cache in expected:
        cache[:, [1, 2, 5]] = cache[:, [0, 1, 4]].clone()
    # A chain (0 -> 1 -> 2): every source is read before any destination is written.
    platform = select_platform("cpu")
    platform.copy_blocks(BlockCopyRequest(caches, (0, 1, 4), (1, 2, 5)))
    for actual, want in zip(caches, expected, strict=True):
        assert torch.equal(actual, want)
    with pytest.raises(ValueError, match="destinations"):
        platform.copy_blocks(BlockCopyRequest(caches, (0, 1), (2,)))


def test_profile_memory_sees_the_peak_of_a_freed_allocation() -> None:
    size = 64 * 2**20

    def run_forward() -> None:
        # Fresh pages from the kernel (a malloc could reuse a region that earlier tests
        # left resident, and RSS would not grow), touched so they count, then unmapped.
        scratch = mmap.mmap(-1, size)
        for offset in range(0, size, mmap.PAGESIZE):
            scratch[offset] = 1
        scratch.close()

    profile = select_platform("cpu").profile_memory(
        MemoryProfileRequest(torch.device("cpu"), run_forward)
    )
    assert profile.total_bytes > profile.used_bytes > 0
    status = Path("/proc/self/status")
    if not status.exists() or "VmHWM:" not in status.read_text():
        pytest.skip("this OS reports no RSS high-water mark")
    assert profile.peak_activation_bytes >= size * 3 // 4
