"""Default batch limits: how many sequences and tokens one step may hold when the user
names neither ``max_num_seqs`` nor ``max_num_batched_tokens``.

The rule follows the device, never the platform's name (vLLM's defaults, so that the two
engines compare out of the box):

- a platform whose KV cache lives in host memory (it declares
  ``PlatformInfo.default_kv_cache_bytes``, e.g. the CPU) keeps 256 sequences and 8192
  tokens: host memory says nothing about its speed;
- a device of :data:`LARGE_DEVICE_BYTES` or more holds 1024 sequences, and 16384 tokens a
  step offline or 8192 online (the server: shorter steps, shorter inter-token gaps);
- a smaller device holds 256 sequences, and 8192 tokens offline or 2048 online.
"""

from __future__ import annotations

import dataclasses

from kvplane.config import BatchLimits, EngineConfig
from kvplane.plugins.platform import Platform

#: Devices with at least this much memory (an H100 or H200, an MI300X) get the large limits.
LARGE_DEVICE_BYTES = 70 * 2**30


#: (offline, online) limits per class of device.
HOST_MEMORY_LIMITS = (BatchLimits(256, 8192), BatchLimits(256, 8192))
LARGE_DEVICE_LIMITS = (BatchLimits(1024, 16384), BatchLimits(1024, 8192))
SMALL_DEVICE_LIMITS = (BatchLimits(256, 8192), BatchLimits(256, 2048))


def default_batch_limits(platform: Platform, online: bool, device_index: int = 0) -> BatchLimits:
    """The limits :mod:`this module's <kvplane.engine.batch_limits>` rule gives ``platform``."""
    if platform.info.default_kv_cache_bytes is not None:
        limits = HOST_MEMORY_LIMITS
    elif platform.device_memory(device_index).total_bytes >= LARGE_DEVICE_BYTES:
        limits = LARGE_DEVICE_LIMITS
    else:
        limits = SMALL_DEVICE_LIMITS
    return limits[1] if online else limits[0]


def with_batch_limits(config: EngineConfig, platform: Platform) -> EngineConfig:
    """``config`` with its unset batch limits filled in for ``platform``."""
    if config.max_num_seqs is not None and config.max_num_batched_tokens is not None:
        return config
    defaults = default_batch_limits(platform, online=config.usage == "online")
    return dataclasses.replace(
        config,
        max_num_seqs=config.max_num_seqs or defaults.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens or defaults.max_num_batched_tokens,
    )
