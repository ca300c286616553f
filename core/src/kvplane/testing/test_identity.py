"""Conformance: probe, platform info and device memory are present and sane."""

from __future__ import annotations

import torch

from kvplane.plugins import Platform, probe_platforms
from kvplane.plugins.capabilities import MULTI_DEVICE
from kvplane.testing.helpers import parse_dtype


def test_probe_reports_available_and_selectable(kvplane_platform: Platform) -> None:
    statuses = {status.name: status for status in probe_platforms(kvplane_platform.name)}
    status = statuses[kvplane_platform.name]
    assert status.available, status.reason
    assert status.error is None
    assert status.selected
    assert isinstance(status.score, int)
    assert isinstance(status.reason, str)


def test_info_fields_are_sane(kvplane_platform: Platform) -> None:
    info = kvplane_platform.info
    assert info.name == kvplane_platform.name, "PlatformInfo.name should be the entry-point name"
    assert torch.device(info.device_type).type == info.device_type
    assert isinstance(info.device_count, int) and info.device_count >= 1
    assert info.supported_dtypes, "a platform must support at least one dtype"
    assert all(isinstance(flag, str) for flag in info.capabilities)
    assert isinstance(info.distributed_backend, str) and info.distributed_backend
    if MULTI_DEVICE in info.capabilities:
        import torch.distributed as dist

        assert dist.is_backend_available(info.distributed_backend), (
            f"distributed backend {info.distributed_backend!r} is not available in torch"
        )


def test_supported_dtypes_parse_to_float_torch_dtypes(kvplane_platform: Platform) -> None:
    for name in kvplane_platform.info.supported_dtypes:
        dtype = parse_dtype(name)
        assert dtype.is_floating_point, f"{name} is not a floating-point dtype"
        assert kvplane_platform.supports_dtype(dtype)


def test_device_memory_total_at_least_free(kvplane_platform: Platform) -> None:
    for index in range(kvplane_platform.info.device_count):
        memory = kvplane_platform.device_memory(index)
        assert memory is not None, "kvplane_device_memory returned None"
        assert memory.total_bytes >= memory.free_bytes > 0, (index, memory)


def test_device_holds_tensors(kvplane_platform: Platform, kvplane_device: torch.device) -> None:
    assert kvplane_device.type == kvplane_platform.info.device_type
    tensor = torch.arange(4, device=kvplane_device) * 2
    assert tensor.device.type == kvplane_platform.info.device_type
    assert tensor.cpu().tolist() == [0, 2, 4, 6]
