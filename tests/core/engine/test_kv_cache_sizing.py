"""KV-cache sizing: explicit bytes, the platform default, or profiling through the hook."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvplane import LLM, SamplingParams
from kvplane.engine.inputs import largest_step_inputs
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


def test_the_profile_runs_the_largest_step(
    model_dir: Path, profiled_platform: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The forward of ``max_num_batched_tokens`` tokens, then the logits and sampling of
    ``max_num_seqs`` rows: what a full step allocates on top of the weights."""
    from kvplane.models.base import CausalLM
    from kvplane.sampling.sampler import Sampler

    seen: dict[str, list[int]] = {"tokens": [], "logit_rows": [], "sampled_rows": []}
    model_call, compute_logits, launch = CausalLM.__call__, CausalLM.compute_logits, Sampler.launch

    def spy_call(self: CausalLM, token_ids: Any, *args: Any, **kwargs: Any) -> Any:
        seen["tokens"].append(token_ids.shape[0])
        return model_call(self, token_ids, *args, **kwargs)

    def spy_logits(self: CausalLM, hidden: Any) -> Any:
        seen["logit_rows"].append(hidden.shape[0])
        return compute_logits(self, hidden)

    def spy_launch(self: Sampler, logits: Any, states: Any, *args: Any) -> Any:
        seen["sampled_rows"].append(len(states))
        return launch(self, logits, states, *args)

    monkeypatch.setattr(CausalLM, "__call__", spy_call)
    monkeypatch.setattr(CausalLM, "compute_logits", spy_logits)
    monkeypatch.setattr(Sampler, "launch", spy_launch)
    make_llm(
        model_dir,
        gpu_memory_utilization=0.5,
        max_model_len=128,
        max_num_batched_tokens=300,
        max_num_seqs=7,
    )
    assert profiled_platform == [1]
    assert seen == {"tokens": [300], "logit_rows": [7], "sampled_rows": [7]}


def test_largest_step_inputs_are_a_valid_prefill() -> None:
    host = largest_step_inputs(100, 32, 16, num_sampled_rows=5)
    assert host.seq_lens.tolist() == [32, 32, 32, 4]
    assert host.query_start_loc.tolist() == [0, 32, 64, 96, 100]
    assert host.positions.tolist() == [*range(32)] * 3 + [0, 1, 2, 3]
    # Every token has a slot of its own, in its sequence's own blocks.
    assert sorted(host.slot_mapping.tolist()) == [*range(96), *range(96, 100)]
    assert host.block_tables.tolist() == [[0, 1], [2, 3], [4, 5], [6, 0]]
    assert host.logits_indices.tolist() == [95, 96, 97, 98, 99]
    assert host.sample_rows == (0, 1, 2, 3, 4) and len(host.sample_request_ids) == 5
    assert largest_step_inputs(3, 32, 16, num_sampled_rows=8).logits_indices.tolist() == [0, 1, 2]
