"""FP8 KV-cache scales in checkpoints: each tool's names reach the attention layers;
scales that are not per-tensor, or not positive, are refused naming the tensor."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kvplane import LLM
from kvplane.models.kv_scales import KVScaleName, is_unused_attention_scale, match_kv_scale
from kvplane.models.layers.attention import Attention
from kvplane.models.weights import WeightLoadError
from kvplane.testing.models import save_random_model, tiny_llama_config

LOADER_LOGGER = "kvplane.models.loader"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny")
    save_random_model(tiny_llama_config(), directory)
    return directory


def with_tensors(model_dir: Path, target: Path, extra: dict[str, torch.Tensor]) -> Path:
    tensors = load_file(str(model_dir / "model.safetensors"))
    tensors.update(extra)
    target.mkdir()
    save_file(tensors, str(target / "model.safetensors"))
    (target / "config.json").write_text((model_dir / "config.json").read_text())
    return target


def load(directory: Path, **options: object) -> LLM:
    return LLM(
        model=str(directory),
        device="cpu",
        dtype="float32",
        skip_tokenizer_init=True,
        kv_cache_memory_bytes=4 * 2**20,
        max_num_batched_tokens=64,
        **options,  # type: ignore[arg-type]
    )


def layer_scales(llm: LLM) -> list[tuple[float, float]]:
    layers = [m for m in llm.engine.runner.model.modules() if isinstance(m, Attention)]
    return [(layer.impl.k_scale, layer.impl.v_scale) for layer in layers]


def test_names_each_tool_writes() -> None:
    prefix = "model.layers.3.self_attn"
    assert match_kv_scale(f"{prefix}.k_scale") == KVScaleName(prefix, ("k",))
    assert match_kv_scale(f"{prefix}.v_scale") == KVScaleName(prefix, ("v",))
    assert match_kv_scale(f"{prefix}.k_proj.k_scale") == KVScaleName(prefix, ("k",))
    assert match_kv_scale(f"{prefix}.v_proj.output_scale") == KVScaleName(prefix, ("v",))
    assert match_kv_scale(f"{prefix}.kv_scale") == KVScaleName(prefix, ("k", "v"))
    for other in (f"{prefix}.k_proj.weight_scale", f"{prefix}.k_proj.input_scale"):
        assert match_kv_scale(other) is None
    assert is_unused_attention_scale(f"{prefix}.q_proj.output_scale")
    assert is_unused_attention_scale(f"{prefix}.prob_scale")


LAYOUTS = {
    "compressed-tensors": ("self_attn.k_scale", "self_attn.v_scale"),
    "modelopt": ("self_attn.k_proj.k_scale", "self_attn.v_proj.v_scale"),
    "output-scale": ("self_attn.k_proj.output_scale", "self_attn.v_proj.output_scale"),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_sets_its_layers_scales(layout: str, model_dir: Path, tmp_path: Path) -> None:
    k_name, v_name = LAYOUTS[layout]
    extra = {
        f"model.layers.{i}.{name}": torch.tensor([value * (i + 1)])  # shape [1] or []
        for i in range(2)
        for name, value in ((k_name, 0.5), (v_name, 0.25))
    }
    # Query and probability scales only matter to FP8 attention arithmetic: skipped.
    extra["model.layers.0.self_attn.q_scale"] = torch.tensor(0.1)
    extra["model.layers.0.self_attn.prob_scale"] = torch.tensor(0.1)
    llm = load(with_tensors(model_dir, tmp_path / layout, extra), kv_cache_dtype="fp8")
    assert layer_scales(llm) == [(0.5, 0.25), (1.0, 0.5)]


def test_one_kv_scale_sets_both(model_dir: Path, tmp_path: Path) -> None:
    extra = {"model.layers.1.self_attn.kv_scale": torch.tensor(0.125)}
    llm = load(with_tensors(model_dir, tmp_path / "autofp8", extra), kv_cache_dtype="fp8")
    assert layer_scales(llm) == [(1.0, 1.0), (0.125, 0.125)]


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        (
            torch.full((2,), 0.5),
            r"KV-cache scales must be per-tensor \(one value\), got shape \(2,\)",
        ),
        (torch.tensor(0.0), r"KV-cache scale 0.0 is not positive"),
        (torch.tensor(float("nan")), r"KV-cache scale nan is not positive"),
    ],
)
def test_scales_that_are_not_one_positive_number_are_refused(
    tensor: torch.Tensor, message: str, model_dir: Path, tmp_path: Path
) -> None:
    extra = {"model.layers.0.self_attn.k_scale": tensor}
    directory = with_tensors(model_dir, tmp_path / "bad", extra)
    with pytest.raises(WeightLoadError, match=r"model\.layers\.0\.self_attn\.k_scale: " + message):
        load(directory, kv_cache_dtype="fp8")


def test_a_float_cache_leaves_the_scales_unused_and_says_so(
    model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    extra = {"model.layers.0.self_attn.k_scale": torch.tensor(0.5)}
    directory = with_tensors(model_dir, tmp_path / "scaled", extra)
    with caplog.at_level(logging.INFO, logger=LOADER_LOGGER):
        llm = load(directory)
    assert "KV-cache scales (for 1 of 2 attention layers) are unused" in caplog.text
    assert llm.engine.runner.kv_cache_dtype() == torch.float32
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=LOADER_LOGGER):
        load(model_dir, kv_cache_dtype="fp8")
    assert "FP8 KV cache: the checkpoint has no k_scale / v_scale; every scale is 1.0" in (
        caplog.text
    )
