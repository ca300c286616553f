"""Step graphs (decode and mixed) end to end with the CUDA platform's Triton attention,
on the CPU.

A test platform pairs the ``cuda-triton`` backend (run by Triton's interpreter on CPU
tensors) with a graph runner that "replays" by calling the first step function it saw
per bucket. Greedy tokens with graphs must equal those without, overlapped or not: a
captured step that read anything but its static buffers, or mishandled padding
sequences and upper-bound lengths, would change them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvplane import LLM, SamplingParams
from kvplane.attention.backend import AttentionBackend
from kvplane.engine.graph_runner import GraphRunner
from kvplane.plugins import capabilities, hookimpl, register_platform, unregister_platform
from kvplane.plugins.types import (
    AttentionSpec,
    GraphCaptureRequest,
    MemoryInfo,
    PlatformInfo,
    ProbeResult,
)
from kvplane.testing.models import save_random_model, tiny_llama_config
from tests.core.engine.test_step_graphs import ReplayingRunner
from tests.plugin_modules import platform_module

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="runs the kernels in the interpreter"
)
NAME = "triton-graphs-on-cpu"


@pytest.fixture(scope="module")
def runners() -> list[ReplayingRunner]:
    return []


@pytest.fixture(scope="module")
def platform(runners: list[ReplayingRunner]) -> Iterator[str]:
    from kvplane_cuda.attention import TritonAttentionBackend

    @hookimpl
    def kvplane_platform_probe() -> ProbeResult:
        return ProbeResult(True, 0, "test platform")

    @hookimpl
    def kvplane_platform_info() -> PlatformInfo:
        return PlatformInfo(
            NAME,
            "cpu",
            1,
            ("float32",),
            capabilities=frozenset({capabilities.GRAPH_CAPTURE}),
            default_kv_cache_bytes=4 * 2**20,
        )

    @hookimpl
    def kvplane_device_memory(query: object) -> MemoryInfo:
        return MemoryInfo(2**30, 2**30)

    @hookimpl
    def kvplane_attention_backends(spec: AttentionSpec) -> list[AttentionBackend]:
        return [TritonAttentionBackend()]

    @hookimpl
    def kvplane_graph_runner(request: GraphCaptureRequest) -> GraphRunner:
        runner = ReplayingRunner(request.bucket_sizes)
        runners.append(runner)
        return runner

    module = platform_module(
        "triton_graphs_on_cpu",
        kvplane_platform_probe,
        kvplane_platform_info,
        kvplane_device_memory,
        kvplane_attention_backends,
        kvplane_graph_runner,
    )
    register_platform(NAME, module)
    yield NAME
    unregister_platform(NAME)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-llama-graphs")
    save_random_model(tiny_llama_config(), directory)
    return directory


def generate(model_dir: Path, platform: str, **options: object) -> list[list[int]]:
    llm = LLM(
        model=str(model_dir),
        device=platform,
        dtype="float32",
        skip_tokenizer_init=True,
        max_num_seqs=8,
        max_num_batched_tokens=48,
        # Captured steps bound every sequence's length by the model's maximum: 128 gives
        # decode two KV partitions (both holding keys past 32 tokens of context, the
        # second empty below), where 512 gives up to eight, mostly empty, for nearly
        # three times the interpreter's work.
        max_model_len=128,
        **options,
    )  # type: ignore[arg-type]
    # Mixed lengths, more prompts than seats: batches shrink and grow through the buckets.
    prompts = [
        [(7 * i + 3 * j) % 250 + 1 for j in range(n)]
        for i, n in enumerate([3, 40, 17, 1, 9, 30, 5, 12, 21, 2])
    ]
    params = [
        SamplingParams(temperature=0.0, max_tokens=6 + 3 * (i % 4), detokenize=False)
        for i in range(len(prompts))
    ]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    assert llm.engine.runner.step_graphs or options.get("enforce_eager")
    return [list(o.outputs[0].token_ids) for o in outputs]


@pytest.fixture(scope="module")
def eager(model_dir: Path, platform: str) -> list[list[int]]:
    """Tokens without graphs (overlapped steps give the same: test_async_scheduling.py)."""
    return generate(model_dir, platform, enforce_eager=True, async_scheduling=False)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_replayed_steps_give_the_eager_tokens(
    model_dir: Path,
    platform: str,
    runners: list[ReplayingRunner],
    eager: list[list[int]],
    async_scheduling: bool,
) -> None:
    graphed = generate(model_dir, platform, async_scheduling=async_scheduling)
    assert graphed == eager
    decode_runner, mixed_runner = runners[-2:]
    assert set(decode_runner.captured) == {1, 2, 4, 8}
    assert decode_runner.num_runs > 2 * len(decode_runner.captured)  # decode steps replayed
    # Prompt chunks next to decodes (budget 48 tokens) replay from the mixed graphs.
    assert set(mixed_runner.captured) == {16, 32, 48}
    assert mixed_runner.num_runs > len(mixed_runner.captured) + 3


def test_decode_graphs_alone_when_mixed_capture_is_off(
    model_dir: Path, platform: str, runners: list[ReplayingRunner], eager: list[list[int]]
) -> None:
    num_runners = len(runners)
    graphed = generate(model_dir, platform, max_mixed_graph_tokens=0)
    assert graphed == eager
    assert len(runners) == num_runners + 1 and set(runners[-1].captured) == {1, 2, 4, 8}


def test_moe_with_the_reference_fused_moe_runs_eagerly(
    platform: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The reference fused_moe reads expert counts on the host: no graph may hold it.
    from transformers import Qwen3MoeConfig

    config = Qwen3MoeConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_experts=4,
        num_experts_per_tok=2,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    save_random_model(config, tmp_path)
    with caplog.at_level("INFO", logger="kvplane.engine.llm_engine"):
        llm = LLM(model=str(tmp_path), device=platform, dtype="float32", skip_tokenizer_init=True)  # type: ignore[arg-type]
    assert llm.engine.runner.step_graphs == ()
    assert "FusedMoE cannot be captured" in caplog.text
    params = SamplingParams(temperature=0.0, max_tokens=3, detokenize=False)
    output = llm.generate({"prompt_token_ids": [5, 6, 7]}, params)
    assert len(output[0].outputs[0].token_ids) == 3
