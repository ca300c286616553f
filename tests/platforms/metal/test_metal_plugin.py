"""The Metal plugin on any machine: it imports without a GPU, its probe gives precise
reasons, and its memory budget is the GPU working set (Macs of 16 and 64 GB faked)."""

from __future__ import annotations

import inspect
import platform as os_platform
import subprocess
import sys
from collections.abc import Callable

import pytest
import torch

from kvplane.plugins import PLUGIN_API_VERSION, capabilities, hookspec
from kvplane.plugins.types import MemoryProfileRequest
from kvplane_metal import memory, plugin, probe

GiB = 2**30


def test_import_touches_no_gpu() -> None:
    code = (
        "import kvplane_metal.plugin as plugin\n"
        "result = plugin.kvplane_platform_probe()\n"
        "print(result.available, result.reason)\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip()


def test_declares_the_api_and_no_graphs_or_pinning() -> None:
    assert plugin.KVPLANE_PLUGIN_API == PLUGIN_API_VERSION
    specs = {name for name, _ in inspect.getmembers(hookspec, inspect.isfunction)}
    hooks = {name for name in dir(plugin) if name.startswith("kvplane_")}
    assert hooks <= specs and "kvplane_graph_runner" not in hooks
    flags = plugin.kvplane_platform_info().capabilities
    assert capabilities.GRAPH_CAPTURE not in flags and capabilities.PINNED_MEMORY not in flags


# -- probe ------------------------------------------------------------------------------


def fake_mac(
    monkeypatch: pytest.MonkeyPatch,
    *,
    system: str = "Darwin",
    macos: str = "14.5",
    built: bool = True,
    available: bool = True,
    working_set: int = 21 * GiB,
) -> None:
    monkeypatch.setattr(os_platform, "system", lambda: system)
    monkeypatch.setattr(os_platform, "mac_ver", lambda: (macos, ("", "", ""), "arm64"))
    monkeypatch.setattr(torch.backends.mps, "is_built", lambda: built)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: available)
    monkeypatch.setattr(torch.mps, "recommended_max_memory", lambda: working_set)
    monkeypatch.setattr(probe, "chip_name", lambda: "Apple M2 Pro")


def test_reason_not_macos(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_mac(monkeypatch, system="Linux", built=False, available=False)
    result = probe.probe()
    assert not result.available and result.score == 0
    assert result.reason.startswith("not macOS (this is Linux)")


def test_reason_torch_without_mps(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_mac(monkeypatch, built=False, available=False)
    result = probe.probe()
    assert not result.available and "built without MPS" in result.reason
    info = plugin.kvplane_platform_info()  # does not crash without a device either
    assert info.device_count == 0 and info.distributed_backend == "gloo"


def test_reason_macos_too_old(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_mac(monkeypatch, macos="12.1", available=False)
    result = probe.probe()
    assert not result.available
    assert result.reason.startswith("macOS 12.1 is too old") and "12.3" in result.reason


def test_reason_mps_built_but_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_mac(monkeypatch, available=False)
    result = probe.probe()
    assert not result.available and "is_available() is False" in result.reason


def test_available_on_a_mac_names_chip_macos_and_gpu_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake_mac(monkeypatch, working_set=21 * GiB)
    result = probe.probe()
    assert result.available and result.score == probe.PROBE_SCORE
    assert result.reason.startswith("Apple M2 Pro, macOS 14.5, GPU working set 21.0 GiB")
    info = plugin.kvplane_platform_info()
    assert info.device_type == "mps" and info.device_count == 1
    assert info.supported_dtypes == ("float16", "float32", "bfloat16")


def test_no_bfloat16_before_macos_14(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_mac(monkeypatch, macos="13.6")
    assert plugin.kvplane_platform_info().supported_dtypes == ("float16", "float32")


# -- unified memory -----------------------------------------------------------------------


class FakeMetal:
    """``torch.mps``'s memory calls on a Mac holding ``weights`` whose forward pass
    needs ``activations`` more."""

    def __init__(self, working_set: int, weights: int, activations: int) -> None:
        self.working_set, self.activations = working_set, activations
        self.idle = GiB // 4
        self.allocated = weights + self.idle

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(torch.mps, "recommended_max_memory", lambda: self.working_set)
        monkeypatch.setattr(torch.mps, "driver_allocated_memory", lambda: self.allocated)
        monkeypatch.setattr(torch.mps, "synchronize", lambda: None)
        monkeypatch.setattr(torch.mps, "empty_cache", self.empty_cache)

    def empty_cache(self) -> None:
        # Weight loading left this much idle in the pool; giving it back is not "used".
        self.allocated -= self.idle

    def run_forward(self) -> None:
        # The allocator keeps the run's buffers in its pool: it grows by the peak.
        self.allocated += self.activations


@pytest.mark.parametrize(
    "ram, working_set",
    [(16 * GiB, int(10.67 * GiB)), (64 * GiB, 48 * GiB)],
    ids=["16GB-mac", "64GB-mac"],
)
def test_kv_budget_is_the_working_set_minus_weights_and_activations(
    monkeypatch: pytest.MonkeyPatch, ram: int, working_set: int
) -> None:
    weights, activations = 2 * GiB, GiB // 2
    metal = FakeMetal(working_set, weights, activations)
    metal.install(monkeypatch)
    info = memory.device_memory(0, memory.MpsMemory())
    assert info.total_bytes == working_set < ram  # never the whole RAM
    assert info.free_bytes == working_set - weights - metal.idle
    request = MemoryProfileRequest(torch.device("mps", 0), metal.run_forward)
    profile = memory.profile_memory(request, memory.MpsMemory())
    assert profile.total_bytes == working_set
    assert (profile.used_bytes, profile.peak_activation_bytes) == (weights, activations)
    utilization = 0.9  # what the core then leaves for the KV cache
    kv_bytes = utilization * profile.total_bytes - profile.used_bytes - activations
    assert 0 < kv_bytes < working_set - weights
    with pytest.raises(ValueError, match="one GPU"):
        memory.device_memory(1, memory.MpsMemory())


@pytest.mark.parametrize(
    "ram, share", [(16 * GiB, 2 / 3), (64 * GiB, 3 / 4)], ids=["16GB-mac", "64GB-mac"]
)
def test_emulated_working_set_follows_macos_rule(ram: int, share: float) -> None:
    assert memory.recommended_working_set(ram) == int(ram * share)


def test_emulated_profile_runs_the_same_budgeting_on_host_memory() -> None:
    size = 64 << 20
    run: Callable[[], None] = lambda: torch.ones(size, dtype=torch.uint8).sum()  # noqa: E731
    profile = memory.profile_memory(
        MemoryProfileRequest(torch.device("cpu"), run), memory.HostMemory()
    )
    assert profile.total_bytes == memory.HostMemory().working_set_bytes()
    assert profile.used_bytes > 0 and profile.peak_activation_bytes >= 0
