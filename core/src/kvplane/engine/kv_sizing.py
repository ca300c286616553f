"""How many KV blocks the engine allocates: the configured bytes, the platform's default, or
what a profiled forward pass leaves of the device at the memory-utilization target."""

from __future__ import annotations

import math

from kvplane.config import DEFAULT_GPU_MEMORY_UTILIZATION, EngineConfig
from kvplane.engine.model_runner import ModelRunner
from kvplane.plugins.platform import Platform


def num_kv_blocks(
    config: EngineConfig, max_model_len: int, platform: Platform, runner: ModelRunner
) -> int:
    """The number of KV blocks to allocate (profiling through ``runner`` if needed).

    Raises ``ValueError`` when they cannot hold one sequence of ``max_model_len`` tokens.
    """
    kv_bytes = config.kv_cache_memory_bytes
    if kv_bytes is None and config.gpu_memory_utilization is None:
        kv_bytes = platform.info.default_kv_cache_bytes
    if kv_bytes is None:
        utilization = config.gpu_memory_utilization or DEFAULT_GPU_MEMORY_UTILIZATION
        limits = config.batch_limits()
        total, available = runner.profile_activation_bytes(
            limits.max_num_batched_tokens, max_model_len, limits.max_num_seqs
        )
        kv_bytes = int(available - total * (1.0 - utilization))
    num_blocks = kv_bytes // runner.bytes_per_block()
    needed = math.ceil(max_model_len / config.block_size)
    if num_blocks < needed:
        raise ValueError(
            f"the KV cache ({max(kv_bytes, 0) / 2**20:.1f} MiB, {max(num_blocks, 0)} "
            f"blocks) cannot hold one sequence of max_model_len {max_model_len} ({needed} "
            "blocks); raise gpu_memory_utilization / kv_cache_memory_bytes or lower "
            "max_model_len"
        )
    return int(num_blocks)
