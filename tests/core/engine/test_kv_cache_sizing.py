"""KV-cache sizing: explicit bytes, the platform default, or profiling through the hook."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kvplane import LLM, SamplingParams
from kvplane.plugins import hookimpl, register_platform, unregister_platform
from kvplane.plugins.types import MemoryInfo, MemoryProfile, PlatformInfo, ProbeResult
from tests.plugin_modules import platform_module

MiB = 2**20
PROFILE = MemoryProfile(total_bytes=100 * MiB, used_bytes=20 * MiB, peak_activation_bytes=10 * MiB)


@pytest.fixture
def profiled_platform() -> Iterator[list[int]]:
    """A platform whose memory-profiling hook reports fixed figures; yields the number of
    times the profile ran a forward pass."""
    runs: list[int] = []

    @hookimpl
    def kvplane_platform_probe() -> ProbeResult:
        return ProbeResult(True, 0, "test platform")

    @hookimpl
    def kvplane_platform_info() -> PlatformInfo:
        return PlatformInfo("profiled", "cpu", 1, ("float32",), default_kv_cache_bytes=MiB)

    @hookimpl
    def kvplane_device_memory(query: object) -> MemoryInfo:
        return MemoryInfo(PROFILE.total_bytes, PROFILE.total_bytes - PROFILE.used_bytes)

    @hookimpl
    def kvplane_profile_memory(request: object) -> MemoryProfile:
        request.run_forward()  # type: ignore[attr-defined]
        runs.append(1)
        return PROFILE

    module = platform_module(
        "profiled_platform",
        kvplane_platform_probe,
        kvplane_platform_info,
        kvplane_device_memory,
        kvplane_profile_memory,
        api="1.0",
    )
    register_platform("profiled", module)
    yield runs
    unregister_platform("profiled")


def make_llm(model_dir: Path, **options: object) -> LLM:
    return LLM(
        model=str(model_dir),
        device="profiled",
        dtype="float32",
        skip_tokenizer_init=True,
        **options,
    )  # type: ignore[arg-type]


def test_gpu_memory_utilization_sizes_the_cache_by_profiling(
    model_dir: Path, profiled_platform: list[int]
) -> None:
    llm = make_llm(model_dir, gpu_memory_utilization=0.5)
    bytes_per_block = llm.engine.runner.bytes_per_block()
    expected_bytes = 100 * MiB * 0.5 - 20 * MiB - 10 * MiB
    assert llm.engine.scheduler.block_manager.num_blocks == int(expected_bytes) // bytes_per_block
    assert profiled_platform == [1]
    params = SamplingParams(max_tokens=4, detokenize=False)
    assert llm.generate({"prompt_token_ids": [1, 2, 3]}, params)[0].finished


def test_platform_default_is_used_without_a_fraction(
    model_dir: Path, profiled_platform: list[int]
) -> None:
    llm = make_llm(model_dir, max_model_len=128)
    assert (
        llm.engine.scheduler.block_manager.num_blocks == MiB // llm.engine.runner.bytes_per_block()
    )
    assert profiled_platform == []


def test_explicit_bytes_win(model_dir: Path, profiled_platform: list[int]) -> None:
    llm = make_llm(model_dir, kv_cache_memory_bytes=2 * MiB, gpu_memory_utilization=0.5)
    bytes_per_block = llm.engine.runner.bytes_per_block()
    assert llm.engine.scheduler.block_manager.num_blocks == 2 * MiB // bytes_per_block
    assert profiled_platform == []


def test_too_small_a_cache_is_a_clear_error(model_dir: Path, profiled_platform: list[int]) -> None:
    with pytest.raises(ValueError, match="cannot hold one sequence of max_model_len"):
        make_llm(model_dir, kv_cache_memory_bytes=64 * 1024)
