"""Emulated CUDA (``KVPLANE_EMULATE=cuda``): the CUDA platform without a GPU.

Its Triton kernels run in Triton's interpreter on host tensors, selected through the
same plugin machinery as on a GPU; the whole engine gives transformers' greedy tokens
in float32.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from kvplane import LLM, SamplingParams
from kvplane.plugins import (
    PlatformSelectionError,
    capabilities,
    probe_platforms,
    select_platform,
)
from kvplane.plugins.selection import EMULATE_ENV
from kvplane.testing.models import hf_greedy_tokens, save_random_model, tiny_llama_config
from kvplane_cuda.emulation import DESCRIPTION

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton"),
    pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU host runs the real platform"),
]
NUM_TOKENS = 12
PROMPTS = ([5, 17, 99, 3], [200, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17], [42])


@pytest.fixture
def emulate_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(EMULATE_ENV, "cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def test_unavailable_without_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(EMULATE_ENV, raising=False)
    status = next(status for status in probe_platforms() if status.name == "cuda")
    assert not status.available and not status.emulated
    assert status.can_emulate and status.emulation == DESCRIPTION
    with pytest.raises(PlatformSelectionError, match=r"without CUDA|no CUDA device"):
        select_platform("cuda")


@pytest.mark.usefixtures("emulate_cuda")
def test_selected_with_the_variable_runs_on_host_tensors() -> None:
    platform = select_platform("cuda")
    assert platform.emulated and platform.name == "cuda"
    assert platform.device(0) == torch.device("cpu", 0)
    # No graphs, streams or pinning; processes over gloo.
    assert platform.info.capabilities == frozenset({capabilities.MULTI_DEVICE})
    assert platform.ops.rms_norm.__module__ == "kvplane_cuda.kernels.norm"


@pytest.mark.slow
@pytest.mark.usefixtures("emulate_cuda")
def test_llm_greedy_matches_transformers_float32(tmp_path: Path) -> None:
    reference = save_random_model(tiny_llama_config(), tmp_path)
    llm = LLM(
        model=str(tmp_path),
        device="cuda",
        dtype="float32",
        skip_tokenizer_init=True,
        max_num_batched_tokens=16,  # chunked prefill: mixed steps through the kernels
        kv_cache_memory_bytes=4 << 20,
    )
    assert llm.engine.platform.emulated
    params = SamplingParams(
        temperature=0.0, max_tokens=NUM_TOKENS, min_tokens=NUM_TOKENS, detokenize=False
    )
    outputs = llm.generate([{"prompt_token_ids": list(p)} for p in PROMPTS], params)
    for prompt, output in zip(PROMPTS, outputs, strict=True):
        expected = hf_greedy_tokens(reference, list(prompt), NUM_TOKENS)
        assert list(output.outputs[0].token_ids) == expected


@pytest.mark.slow
@pytest.mark.usefixtures("emulate_cuda")
def test_llm_with_an_fp8_kv_cache_computes_what_the_cpu_platform_does(tmp_path: Path) -> None:
    """``kv_cache_dtype="fp8"`` through the engine: the Triton cache write and both
    attention kernels (chunked prefill, then decodes) give the CPU platform's greedy
    tokens and, up to float32 rounding, its logits (both store the same FP8 bytes)."""
    from kvplane.testing.models import forward_logits

    save_random_model(tiny_llama_config(), tmp_path)
    llms = [
        LLM(
            model=str(tmp_path),
            device=device,
            dtype="float32",
            kv_cache_dtype="fp8",
            skip_tokenizer_init=True,
            max_num_batched_tokens=16,
            kv_cache_memory_bytes=4 << 20,
        )
        for device in ("cuda", "cpu")
    ]
    assert llms[0].engine.platform.emulated
    assert llms[0].engine.runner.kv_caches[0].dtype == torch.float8_e4m3fn
    params = SamplingParams(
        temperature=0.0, max_tokens=NUM_TOKENS, min_tokens=NUM_TOKENS, detokenize=False
    )
    prompts = [{"prompt_token_ids": list(p)} for p in PROMPTS]
    cuda_tokens, cpu_tokens = (
        [list(output.outputs[0].token_ids) for output in llm.generate(prompts, params)]
        for llm in llms
    )
    assert cuda_tokens == cpu_tokens
    cuda_logits, cpu_logits = (forward_logits(llm, list(PROMPTS[1])) for llm in llms)
    torch.testing.assert_close(cuda_logits, cpu_logits, atol=1e-4, rtol=1e-4)
