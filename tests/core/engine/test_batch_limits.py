"""Default batch limits follow the device: its memory, host or not, offline or online."""

from __future__ import annotations

from types import SimpleNamespace
from typing import cast

import pytest

from kvplane.config import BatchLimits, EngineConfig
from kvplane.engine.batch_limits import LARGE_DEVICE_BYTES, default_batch_limits, with_batch_limits
from kvplane.plugins.platform import Platform
from kvplane.plugins.types import MemoryInfo

GIB = 2**30


def fake_platform(total_bytes: int, host_kv_bytes: int | None = None) -> Platform:
    """What the rule reads of a platform: its info and its device memory."""

    def device_memory(index: int = 0) -> MemoryInfo:
        return MemoryInfo(total_bytes=total_bytes, free_bytes=total_bytes)

    info = SimpleNamespace(default_kv_cache_bytes=host_kv_bytes)
    return cast(Platform, SimpleNamespace(info=info, device_memory=device_memory))


@pytest.mark.parametrize(
    ("total_bytes", "online", "expected"),
    [
        (80 * GIB, False, BatchLimits(1024, 16384)),  # an H100: vLLM's LLM-class defaults
        (80 * GIB, True, BatchLimits(1024, 8192)),  # served: vLLM's API-server defaults
        (LARGE_DEVICE_BYTES, False, BatchLimits(1024, 16384)),
        (LARGE_DEVICE_BYTES - 1, False, BatchLimits(256, 8192)),
        (24 * GIB, True, BatchLimits(256, 2048)),
    ],
)
def test_device_limits(total_bytes: int, online: bool, expected: BatchLimits) -> None:
    assert default_batch_limits(fake_platform(total_bytes), online) == expected


@pytest.mark.parametrize("online", [False, True])
def test_host_memory_platform_keeps_its_limits_whatever_the_memory(online: bool) -> None:
    platform = fake_platform(512 * GIB, host_kv_bytes=GIB)
    assert default_batch_limits(platform, online) == BatchLimits(256, 8192)


def test_given_limits_win_and_unset_ones_are_filled() -> None:
    platform = fake_platform(80 * GIB)
    given = with_batch_limits(EngineConfig(max_num_seqs=8, max_num_batched_tokens=64), platform)
    assert given.batch_limits() == BatchLimits(8, 64)
    half = with_batch_limits(EngineConfig(max_num_seqs=8, usage="online"), platform)
    assert half.batch_limits() == BatchLimits(8, 8192)


def test_unresolved_limits_are_an_error_not_a_guess() -> None:
    with pytest.raises(RuntimeError, match="not resolved"):
        EngineConfig().batch_limits()
    with pytest.raises(ValueError, match="usage"):
        EngineConfig(usage="batch")
