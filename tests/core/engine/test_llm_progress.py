"""``LLM.generate(use_tqdm=True)`` counts output tokens as they are produced."""

from __future__ import annotations

import re

import pytest

from kvplane import LLM, SamplingParams
from kvplane.testing.models import save_random_model, tiny_llama_config


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory: pytest.TempPathFactory) -> LLM:
    path = tmp_path_factory.mktemp("tiny")
    save_random_model(tiny_llama_config(), path)
    return LLM(
        str(path), device="cpu", dtype="float32", skip_tokenizer_init=True,
        kv_cache_memory_bytes=2**20,
    )  # fmt: skip


def _last_frame(stderr: str) -> str:
    return re.split(r"[\r\n]", stderr.strip())[-1]


def test_bar_counts_output_tokens_and_requests(
    tiny_llm: LLM, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts = [{"prompt_token_ids": [1, 2, 3 + i]} for i in range(3)]
    params = [SamplingParams(max_tokens=4 + i, ignore_eos=True, detokenize=False) for i in range(3)]
    tiny_llm.generate(prompts, params, use_tqdm=True)  # type: ignore[arg-type]
    frame = _last_frame(capsys.readouterr().err)
    assert "output tokens" in frame
    assert "15/15" in frame  # 4 + 5 + 6 tokens
    assert "tok/s" in frame
    assert "requests 3/3" in frame


def test_bar_ends_full_when_requests_stop_early(
    tiny_llm: LLM, capsys: pytest.CaptureFixture[str]
) -> None:
    # Stop at the first sampled token: the bar's upper bound (2 x 8) is not reached.
    params = SamplingParams(max_tokens=8, temperature=0.0, detokenize=False)
    first = tiny_llm.generate([{"prompt_token_ids": [5, 6]}], params)[0]
    stop_id = first.outputs[0].token_ids[0]
    capsys.readouterr()
    stopping = SamplingParams(
        max_tokens=8, temperature=0.0, stop_token_ids=[stop_id], detokenize=False
    )
    prompts = [{"prompt_token_ids": [5, 6]}, {"prompt_token_ids": [5, 6]}]
    outputs = tiny_llm.generate(prompts, stopping, use_tqdm=True)  # type: ignore[arg-type]
    num_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    frame = _last_frame(capsys.readouterr().err)
    assert num_tokens < 16
    assert f"{num_tokens}/{num_tokens}" in frame
    assert "100%" in frame
