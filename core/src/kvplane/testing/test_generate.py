"""End to end: the engine on this platform gives transformers' greedy tokens.

A tiny random-weight Llama built from the real transformers config, a batch of
mixed-length prompts, float32, under a small token budget so prefills are chunked and
run beside decodes.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

from kvplane.testing.models import hf_greedy_tokens, save_random_model, tiny_llama_config

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM

NUM_TOKENS = 16


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LlamaForCausalLM]:
    directory = tmp_path_factory.mktemp("tiny-llama")
    return directory, save_random_model(tiny_llama_config(), directory)


def test_greedy_generate_matches_transformers(
    kvplane_platform,
    tiny_model: tuple[Path, LlamaForCausalLM],
) -> None:
    if "float32" not in kvplane_platform.info.supported_dtypes:
        pytest.skip("the platform does not run float32, which token-exactness needs")
    from kvplane import LLM, SamplingParams

    directory, reference = tiny_model
    llm = LLM(
        model=str(directory),
        device=kvplane_platform.name,
        dtype="float32",
        skip_tokenizer_init=True,
        kv_cache_memory_bytes=4 * 2**20,
        max_num_batched_tokens=32,
        enforce_eager=False,
    )
    generator = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(0, 256, (length,), generator=generator).tolist()
        for length in (3, 40, 17, 1, 64, 9)
    ]
    params = SamplingParams(
        temperature=0.0, max_tokens=NUM_TOKENS, min_tokens=NUM_TOKENS, detokenize=False
    )
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    for prompt, output in zip(prompts, outputs, strict=True):
        expected = hf_greedy_tokens(reference, prompt, NUM_TOKENS)
        assert list(output.outputs[0].token_ids) == expected
    block_manager = llm.engine.scheduler.block_manager
    block_manager.check_invariants()
    assert block_manager.num_free_blocks == block_manager.num_blocks
