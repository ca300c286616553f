"""GPTQ and AWQ checkpoints end to end: an int4 model is an exact function of its stored
weights, so kvplane must match transformers run on the dequantized weights in float32
(logits within 1e-4 relative, greedy tokens identical)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from kvplane import SamplingParams
from kvplane.cli.main import main as cli_main
from kvplane.models.weights import WeightLoadError
from kvplane.quantization.int4_packing import dequantize_awq, dequantize_gptq
from kvplane.quantization.int4_rtn import quantize_gptq_rtn
from kvplane.testing.models import (
    forward_logits,
    hf_greedy_tokens,
    save_random_model,
    tiny_llama_config,
)
from tests.core.models.harness import RELATIVE_TOLERANCE, load_tiny, random_prompts

GROUP_SIZE = 32
NUM_TOKENS = 16


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("float")
    save_random_model(tiny_llama_config(), directory)
    return directory


def projections(directory: Path) -> dict[str, torch.Tensor]:
    tensors = load_file(str(directory / "model.safetensors"))
    return {name: t for name, t in tensors.items() if name.endswith("_proj.weight")}


def dequantized_model(quantized: Path, float_dir: Path, target: Path) -> Any:
    """The transformers model of ``float_dir`` with every projection replaced by the
    dequantized int4 weight of ``quantized``: the float model the int4 one computes."""
    from transformers import AutoModelForCausalLM

    shutil.copytree(float_dir, target)
    stored = load_file(str(quantized / "model.safetensors"))
    declared = json.loads((quantized / "config.json").read_text())["quantization_config"]
    tensors = load_file(str(float_dir / "model.safetensors"))
    for name in projections(float_dir):
        prefix = name.removesuffix(".weight")
        qweight, qzeros, scales = (stored[f"{prefix}.{k}"] for k in ("qweight", "qzeros", "scales"))
        if declared["quant_method"] == "gptq":
            g_idx = stored[f"{prefix}.g_idx"]
            weight = dequantize_gptq(qweight, qzeros, scales, g_idx, zeros_offset=1)
        else:
            weight = dequantize_awq(qweight, qzeros, scales, declared["group_size"])
        tensors[name] = weight.float().contiguous()
    save_file(tensors, str(target / "model.safetensors"))
    return AutoModelForCausalLM.from_pretrained(str(target), dtype=torch.float32).eval()


def assert_matches(quantized: Path, reference: Any) -> None:
    llm = load_tiny(quantized)
    prompts = random_prompts(reference.config.vocab_size)
    longest = max(prompts, key=len)
    with torch.inference_mode():
        expected = reference(torch.tensor([longest])).logits[0].float()
    error = (forward_logits(llm, longest) - expected).abs().max().item()
    assert error <= RELATIVE_TOLERANCE * expected.abs().max().item(), error
    params = SamplingParams(
        temperature=0.0, max_tokens=NUM_TOKENS, min_tokens=NUM_TOKENS, detokenize=False
    )
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    for prompt, output in zip(prompts, outputs, strict=True):
        assert list(output.outputs[0].token_ids) == hf_greedy_tokens(reference, prompt, NUM_TOKENS)


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_quantize_writes_int4_that_matches_its_dequantized_weights(
    method: str, float_dir: Path, tmp_path: Path
) -> None:
    quantized = tmp_path / method
    args = ["quantize", str(float_dir), str(quantized), "--method", method, "--bits", "4"]
    assert cli_main([*args, "--group-size", str(GROUP_SIZE)]) == 0
    reference = dequantized_model(quantized, float_dir, tmp_path / "oracle")
    assert_matches(quantized, reference)
    llm = load_tiny(quantized)
    layer = llm.engine.runner.model.model.layers[0].self_attn.qkv_proj
    assert layer.quant_method.name == method and layer.qweight.dtype == torch.int32


def _act_order_checkpoint(float_dir: Path, target: Path) -> None:
    """A GPTQ checkpoint with ``desc_act``: each input size's rows grouped by one
    permutation, shared by the matrices that read the same input (Q, K and V; gate and
    up), as act-order quantization of one layer's Hessian gives them."""
    target.mkdir()
    tensors = load_file(str(float_dir / "model.safetensors"))
    generator = torch.Generator().manual_seed(0)
    g_idx_by_size: dict[int, torch.Tensor] = {}
    for name, weight in projections(float_dir).items():
        input_size = weight.shape[1]
        if input_size not in g_idx_by_size:
            order = torch.randperm(input_size, generator=generator)
            g_idx = torch.empty(input_size, dtype=torch.int32)
            g_idx[order] = torch.arange(input_size, dtype=torch.int32) // GROUP_SIZE
            g_idx_by_size[input_size] = g_idx
        packed = quantize_gptq_rtn(weight, GROUP_SIZE, g_idx=g_idx_by_size[input_size])
        del tensors[name]
        prefix = name.removesuffix(".weight")
        tensors.update({f"{prefix}.{key}": t.contiguous() for key, t in packed.items()})
    save_file(tensors, str(target / "model.safetensors"))
    config = json.loads((float_dir / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "gptq",
        "bits": 4,
        "group_size": GROUP_SIZE,
        "desc_act": True,
        "sym": True,
    }
    (target / "config.json").write_text(json.dumps(config))


def test_gptq_act_order_matches_its_dequantized_weights(float_dir: Path, tmp_path: Path) -> None:
    quantized = tmp_path / "act-order"
    _act_order_checkpoint(float_dir, quantized)
    reference = dequantized_model(quantized, float_dir, tmp_path / "oracle")
    assert_matches(quantized, reference)
    layer = load_tiny(quantized).engine.runner.model.model.layers[0].self_attn.qkv_proj
    assert layer.g_idx is not None  # the scattered groups are kept, not assumed


def test_stacked_matrices_with_different_act_orders_are_refused(
    float_dir: Path, tmp_path: Path
) -> None:
    quantized = tmp_path / "act-order"
    _act_order_checkpoint(float_dir, quantized)
    tensors = load_file(str(quantized / "model.safetensors"))
    name = "model.layers.0.self_attn.k_proj.g_idx"
    tensors[name] = tensors[name].flip(0).contiguous()
    save_file(tensors, str(quantized / "model.safetensors"))
    with pytest.raises(
        WeightLoadError, match=r"layers\.0\.self_attn\.[qkv]_proj\.g_idx: .*differs"
    ):
        load_tiny(quantized)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"bits": 8}, "bits 8"),
        ({"group_size": 0}, "group_size"),
        ({"checkpoint_format": "marlin"}, "checkpoint_format"),
    ],
)
def test_unreadable_gptq_configs_name_the_field(
    changes: dict[str, Any], field: str, float_dir: Path, tmp_path: Path
) -> None:
    quantized = tmp_path / "gptq"
    assert cli_main(["quantize", str(float_dir), str(quantized), "--method", "gptq"]) == 0
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"].update(changes)
    (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=field):
        load_tiny(quantized)
