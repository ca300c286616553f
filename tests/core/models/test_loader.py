"""Weight loading: safetensors (single and sharded), tied embeddings, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kvplane import LLM, SamplingParams
from kvplane.models import loader
from kvplane.models.checkpoint import iterate_weights
from kvplane.models.registry import architecture_of
from kvplane.models.source import DEFAULT_MODEL_NAME, resolve_model
from kvplane.models.weights import WeightLoadError
from kvplane.testing.models import hf_greedy_tokens, save_random_model, tiny_llama_config

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, min_tokens=8, detokenize=False)
PROMPT = {"prompt_token_ids": [3, 14, 15, 92, 65, 35]}


def tiny_llm(directory: Path) -> LLM:
    return LLM(
        model=str(directory),
        device="cpu",
        dtype="float32",
        skip_tokenizer_init=True,
        kv_cache_memory_bytes=2**20,
    )


hf_greedy = hf_greedy_tokens


def test_sharded_checkpoint_loads_and_matches(tmp_path: Path) -> None:
    config = tiny_llama_config()
    reference = save_random_model(config, tmp_path / "single")
    reference.save_pretrained(str(tmp_path / "sharded"), max_shard_size="60KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    llm = tiny_llm(tmp_path / "sharded")
    tokens = llm.generate(PROMPT, GREEDY)[0].outputs[0].token_ids
    assert tokens == hf_greedy(reference, PROMPT["prompt_token_ids"], 8)


def test_tied_embeddings_share_the_embedding(tmp_path: Path) -> None:
    reference = save_random_model(tiny_llama_config(tie_word_embeddings=True), tmp_path)
    assert "lm_head.weight" not in load_file(str(tmp_path / "model.safetensors"))
    llm = tiny_llm(tmp_path)
    tokens = llm.generate(PROMPT, GREEDY)[0].outputs[0].token_ids
    assert tokens == hf_greedy(reference, PROMPT["prompt_token_ids"], 8)


def _rewrite_checkpoint(directory: Path, drop: str | None = None, add: str | None = None) -> None:
    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    if drop is not None:
        del tensors[drop]
    if add is not None:
        tensors[add] = torch.zeros(3)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    save_random_model(tiny_llama_config(), tmp_path)
    _rewrite_checkpoint(tmp_path, drop="model.layers.1.mlp.up_proj.weight")
    with pytest.raises(WeightLoadError, match=r"model\.layers\.1\.mlp\.gate_up_proj\.weight"):
        tiny_llm(tmp_path)


def test_unexpected_tensor_is_named(tmp_path: Path) -> None:
    save_random_model(tiny_llama_config(), tmp_path)
    _rewrite_checkpoint(tmp_path, add="model.layers.0.surprise.weight")
    with pytest.raises(WeightLoadError, match=r"model\.layers\.0\.surprise\.weight"):
        tiny_llm(tmp_path)


def test_unsupported_architecture_lists_supported_ones() -> None:
    config = tiny_llama_config()
    config.architectures = ["FancyNewForCausalLM"]
    config.model_type = "fancy"
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        architecture_of(config)


def test_model_names_that_are_not_local_paths_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not download"):
        resolve_model("meta-llama/Llama-3-8B")
    with pytest.raises(ValueError, match=r"no config\.json"):
        resolve_model(tmp_path)


def test_the_default_models_served_name_means_the_embedded_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert resolve_model(DEFAULT_MODEL_NAME) == resolve_model(None)
    # A folder of that name in the working directory wins over the embedded model.
    (tmp_path / DEFAULT_MODEL_NAME).mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"no config\.json"):
        resolve_model(DEFAULT_MODEL_NAME)


def test_dummy_weights_need_only_the_config(tmp_path: Path) -> None:
    tiny_llama_config().save_pretrained(str(tmp_path))
    llm = LLM(
        model=str(tmp_path),
        load_format="dummy",
        device="cpu",
        dtype="float32",
        skip_tokenizer_init=True,
        kv_cache_memory_bytes=2**20,
    )
    assert len(llm.generate(PROMPT, GREEDY)[0].outputs[0].token_ids) == 8


def test_bytes_read_add_up_to_the_checkpoint_data(tmp_path: Path) -> None:
    reference = save_random_model(tiny_llama_config(), tmp_path / "single")
    reference.save_pretrained(str(tmp_path / "sharded"), max_shard_size="60KB")
    source = resolve_model(str(tmp_path / "sharded"))
    counts: list[int] = []
    names = [name for name, _ in iterate_weights(source, reference.config, counts.append)]
    data_bytes = sum(t.numel() * t.element_size() for t in reference.state_dict().values())
    assert len(counts) == len(names) > 1
    assert sum(counts) == data_bytes


def test_weight_loading_shows_a_progress_bar_past_its_delay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    save_random_model(tiny_llama_config(), tmp_path)
    tiny_llm(tmp_path)
    assert "loading weights" not in capsys.readouterr().err  # quicker than the delay
    monkeypatch.setattr(loader, "PROGRESS_DELAY_S", 0.0)
    tiny_llm(tmp_path)
    stderr = capsys.readouterr().err
    assert "loading weights" in stderr
    assert "100%" in stderr
