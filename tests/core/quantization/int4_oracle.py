"""W4A16 end-to-end tests' checkpoints and oracle: GPTQ act-order checkpoints of a float
model, and transformers run on a GPTQ / AWQ checkpoint's dequantized weights, which the
int4 model must match exactly (float32 logits within 1e-4 relative, greedy tokens
identical)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from kvplane import SamplingParams
from kvplane.quantization.int4_packing import dequantize_awq, dequantize_gptq
from kvplane.quantization.int4_rtn import quantize_gptq_rtn
from kvplane.testing.models import forward_logits, hf_greedy_tokens
from tests.core.models.harness import RELATIVE_TOLERANCE, load_tiny, random_prompts

NUM_TOKENS = 16
#: Matrices stacked on one input, whose act-order permutation is therefore that input's.
SHARED_INPUT = {
    "q_proj": "qkv",
    "k_proj": "qkv",
    "v_proj": "qkv",
    "gate_proj": "gate_up",
    "up_proj": "gate_up",
    "w1": "gate_up",
    "w3": "gate_up",
}
#: The tensors that replace a matrix's ``weight`` in the int4 layouts.
_PACKED = ("qweight", "qzeros", "scales", "g_idx")


def dequantized_model(quantized: Path, target: Path) -> Any:
    """The transformers model of ``quantized`` (a single-file checkpoint) with every int4
    matrix (projections and experts alike) replaced by its dequantized float32 weight and
    no ``quantization_config``: the float model the int4 one computes."""
    from transformers import AutoModelForCausalLM

    shutil.copytree(quantized, target)
    config = json.loads((quantized / "config.json").read_text())
    declared = config.pop("quantization_config")
    (target / "config.json").write_text(json.dumps(config))
    stored = load_file(str(quantized / "model.safetensors"))
    tensors = {name: t for name, t in stored.items() if name.rpartition(".")[2] not in _PACKED}
    for name in stored:
        prefix, _, kind = name.rpartition(".")
        if kind != "qweight":
            continue
        qweight, qzeros, scales = (stored[f"{prefix}.{k}"] for k in ("qweight", "qzeros", "scales"))
        if declared["quant_method"] == "gptq":
            g_idx = stored[f"{prefix}.g_idx"]
            weight = dequantize_gptq(qweight, qzeros, scales, g_idx, zeros_offset=1)
        else:
            weight = dequantize_awq(qweight, qzeros, scales, declared["group_size"])
        tensors[f"{prefix}.weight"] = weight.contiguous()
    save_file(tensors, str(target / "model.safetensors"))
    return AutoModelForCausalLM.from_pretrained(str(target), dtype=torch.float32).eval()


def assert_matches(quantized: Path, reference: Any) -> None:
    """kvplane on ``quantized`` against ``reference``: float32 logits of the longest
    prompt within 1e-4 relative, and identical greedy tokens for every prompt."""
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


def write_act_order_checkpoint(float_dir: Path, target: Path, group_size: int) -> None:
    """A GPTQ ``desc_act`` checkpoint of ``float_dir`` (single file): every projection
    and expert matrix quantized with its input rows grouped by a random permutation, one
    per input, shared by the matrices that read it (Q, K and V; gate and up, an
    expert's too), as act-order quantization of one module's Hessian gives them."""
    target.mkdir()
    tensors = load_file(str(float_dir / "model.safetensors"))
    generator = torch.Generator().manual_seed(0)
    orders: dict[str, torch.Tensor] = {}
    for name in sorted(tensors):
        if not (name.endswith("_proj.weight") or ".experts." in name):
            continue
        weight = tensors.pop(name)
        parent, matrix = name.removesuffix(".weight").rsplit(".", 1)
        group = f"{parent}.{SHARED_INPUT.get(matrix, matrix)}"
        if group not in orders:
            g_idx = torch.empty(weight.shape[1], dtype=torch.int32)
            permutation = torch.randperm(weight.shape[1], generator=generator)
            g_idx[permutation] = torch.arange(weight.shape[1], dtype=torch.int32) // group_size
            orders[group] = g_idx
        packed = quantize_gptq_rtn(weight, group_size, g_idx=orders[group])
        prefix = name.removesuffix(".weight")
        tensors.update({f"{prefix}.{key}": t.contiguous() for key, t in packed.items()})
    save_file(tensors, str(target / "model.safetensors"))
    config = json.loads((float_dir / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "gptq",
        "bits": 4,
        "group_size": group_size,
        "desc_act": True,
        "sym": True,
    }
    (target / "config.json").write_text(json.dumps(config))
