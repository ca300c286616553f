"""Quantized checkpoints end to end: ``kvplane quantize`` writes them, the engine loads
them (fused QKV and gate/up included) and its logits stay close to the float model's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kvplane import LLM
from kvplane.cli.main import main as cli_main
from kvplane.models.weights import WeightLoadError
from kvplane.testing.models import forward_logits, save_random_model, tiny_llama_config
from tests.core.models.harness import load_tiny

PROMPT_IDS = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26]
#: Largest |log p - log p_float| over every position and token allowed, in nats, on the
#: tiny model (measured: fp8 0.025, int8 0.006). W8A8 rounds weights and activations to
#: 8 bits: fp8 keeps 3 mantissa bits, int8 about 7.
LOGPROB_TOLERANCE = {"fp8": 0.05, "int8": 0.015}


def logprobs(llm: LLM) -> torch.Tensor:  # [len(PROMPT_IDS), vocab_size]
    return torch.log_softmax(forward_logits(llm, PROMPT_IDS).float(), dim=-1)


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("float")
    save_random_model(tiny_llama_config(), directory)
    return directory


@pytest.fixture(scope="module")
def float_logprobs(float_dir: Path) -> torch.Tensor:
    return logprobs(load_tiny(float_dir))


@pytest.mark.parametrize("method", ["fp8", "int8"])
def test_quantize_then_load_stays_close_to_float(
    method: str, float_dir: Path, float_logprobs: torch.Tensor, tmp_path: Path
) -> None:
    target = tmp_path / method
    assert cli_main(["quantize", str(float_dir), str(target), "--method", method]) == 0
    config = json.loads((target / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    tensors = load_file(str(target / "model.safetensors"))
    expected_dtype = torch.float8_e4m3fn if method == "fp8" else torch.int8
    assert tensors["model.layers.0.self_attn.q_proj.weight"].dtype == expected_dtype
    assert tensors["model.layers.0.self_attn.q_proj.weight_scale"].shape == (64, 1)
    assert tensors["lm_head.weight"].dtype == torch.float32  # kept in float
    quantized = load_tiny(target)
    layer = quantized.engine.runner.model.model.layers[0].self_attn.qkv_proj
    assert layer.quant_method.name == method
    error = (logprobs(quantized) - float_logprobs).abs().max().item()
    assert 0 < error <= LOGPROB_TOLERANCE[method], error


def test_quantize_at_load_equals_the_written_checkpoint(float_dir: Path, tmp_path: Path) -> None:
    # Per-channel scales and the same rounding: the same FP8 model either way.
    assert cli_main(["quantize", str(float_dir), str(tmp_path / "q"), "--method", "fp8"]) == 0
    from_checkpoint = logprobs(load_tiny(tmp_path / "q"))
    at_load = logprobs(load_tiny(float_dir, quantization="fp8"))
    torch.testing.assert_close(at_load, from_checkpoint, rtol=0, atol=1e-5)


def _fp8_tensor_checkpoint(float_dir: Path, target: Path, static: bool) -> None:
    """An ``fp8``-layout checkpoint (per-tensor scales, one per Q/K/V matrix), as
    quantization tools write it from a float model."""
    target.mkdir()
    tensors = load_file(str(float_dir / "model.safetensors"))
    for name in [n for n in tensors if n.endswith("_proj.weight")]:
        weight = tensors.pop(name).float()
        scale = weight.abs().max() / 448.0
        prefix = name.removesuffix(".weight")
        tensors[name] = (weight / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
        tensors[f"{prefix}.weight_scale"] = scale.reshape(())
        if static:
            tensors[f"{prefix}.input_scale"] = torch.tensor(0.02)
    save_file(tensors, str(target / "model.safetensors"))
    config = json.loads((float_dir / "config.json").read_text())
    scheme = "static" if static else "dynamic"
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": scheme}
    (target / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("static", [False, True])
def test_fp8_layout_with_per_tensor_scales(
    static: bool, float_dir: Path, float_logprobs: torch.Tensor, tmp_path: Path
) -> None:
    _fp8_tensor_checkpoint(float_dir, tmp_path / "fp8", static)
    llm = load_tiny(tmp_path / "fp8")
    qkv = llm.engine.runner.model.model.layers[0].self_attn.qkv_proj
    # Q, K and V kept their own scales, now one per output row.
    checkpoint = load_file(str(tmp_path / "fp8" / "model.safetensors"))
    prefix = "model.layers.0.self_attn"
    expected = torch.cat(
        [
            checkpoint[f"{prefix}.{name}_proj.weight_scale"].expand(size)
            for name, size in zip("qkv", qkv.output_sizes, strict=True)
        ]
    )
    assert torch.equal(qkv.weight_scale, expected)
    assert (qkv.input_scale is not None) == static
    error = (logprobs(llm) - float_logprobs).abs().max().item()
    assert error <= LOGPROB_TOLERANCE["fp8"], error


def test_float_tensors_in_a_quantized_checkpoint_name_the_layer(
    float_dir: Path, tmp_path: Path
) -> None:
    target = tmp_path / "bad"
    assert cli_main(["quantize", str(float_dir), str(target), "--method", "fp8"]) == 0
    tensors = load_file(str(target / "model.safetensors"))
    tensors["model.layers.1.mlp.down_proj.weight"] = torch.zeros(64, 128)
    save_file(tensors, str(target / "model.safetensors"))
    with pytest.raises(WeightLoadError, match=r"model\.layers\.1\.mlp\.down_proj\.weight.*float32"):
        load_tiny(target)


def test_ignored_layers_load_in_float(float_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "ignore"
    assert cli_main(["quantize", str(float_dir), str(target), "--method", "int8"]) == 0
    tensors = load_file(str(target / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj"
    tensors.pop(f"{name}.weight_scale")
    tensors[f"{name}.weight"] = load_file(str(float_dir / "model.safetensors"))[f"{name}.weight"]
    save_file(tensors, str(target / "model.safetensors"))
    config = json.loads((target / "config.json").read_text())
    config["quantization_config"]["ignore"].append(name)
    (target / "config.json").write_text(json.dumps(config))
    llm = load_tiny(target)
    layers = llm.engine.runner.model.model.layers
    assert layers[1].mlp.down_proj.quant_method.name == "none"
    assert layers[0].mlp.down_proj.quant_method.name == "int8"


def test_large_checkpoints_are_written_in_shards_with_an_index(
    float_dir: Path, float_logprobs: torch.Tensor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kvplane.quantization import writer

    monkeypatch.setattr(writer, "_SHARD_BYTES", 64 * 1024)
    summary = writer.quantize_checkpoint(float_dir, tmp_path / "sharded", "int8")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert summary.num_shards == len(files) > 1
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert not list((tmp_path / "sharded").glob("*.partial"))
    error = (logprobs(load_tiny(tmp_path / "sharded")) - float_logprobs).abs().max().item()
    assert error <= LOGPROB_TOLERANCE["int8"], error


def test_quantize_refuses_what_it_cannot_write(float_dir: Path, tmp_path: Path) -> None:
    from kvplane.quantization import writer

    with pytest.raises(ValueError, match="method must be one of"):
        writer.quantize_checkpoint(float_dir, tmp_path / "a", "nf4")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(ValueError, match="not empty"):
        writer.quantize_checkpoint(float_dir, tmp_path / "full", "fp8")
    assert cli_main(["quantize", str(float_dir), str(tmp_path / "q"), "--method", "fp8"]) == 0
    with pytest.raises(ValueError, match="already quantized"):
        writer.quantize_checkpoint(tmp_path / "q", tmp_path / "b", "fp8")
    args = ["quantize", str(float_dir), str(tmp_path / "c"), "--method", "gptq", "--bits", "8"]
    assert cli_main(args) == 2  # a user error: one line, no traceback
    assert not (tmp_path / "c").exists()
