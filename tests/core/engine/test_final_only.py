"""``final_only`` requests yield one output, when finished; others stream every step."""

from __future__ import annotations

from pathlib import Path

from kvplane import EngineConfig, LLMEngine, SamplingParams
from kvplane.testing.models import save_random_model, tiny_llama_config


def test_final_only_yields_only_the_finished_output(tmp_path: Path) -> None:
    save_random_model(tiny_llama_config(), tmp_path)
    engine = LLMEngine(
        EngineConfig(
            model=str(tmp_path),
            device="cpu",
            dtype="float32",
            skip_tokenizer_init=True,
            kv_cache_memory_bytes=2**20,
        )
    )
    params = SamplingParams(temperature=0.0, max_tokens=5, min_tokens=5, detokenize=False)
    engine.add_request("final", {"prompt_token_ids": [1, 2, 3]}, params, final_only=True)
    engine.add_request("stream", {"prompt_token_ids": [1, 2, 3]}, params)
    seen: dict[str, list[int]] = {"final": [], "stream": []}
    while engine.has_unfinished_requests():
        for output in engine.step():
            seen[output.request_id].append(len(output.outputs[0].token_ids))
    assert seen["final"] == [5]
    assert seen["stream"] == [1, 2, 3, 4, 5]
