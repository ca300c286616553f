"""Quantized Mixtral and Qwen3-MoE end to end: ``kvplane quantize`` writes the experts
in the layouts vLLM and the quantization tools use, the engine loads them, W4A16 models
match transformers run on their dequantized weights exactly (float32), FP8 ones stay
within a stated distance of the float model, and broken checkpoints name the tensor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import MixtralConfig, Qwen3MoeConfig

from kvplane import LLM
from kvplane.cli.main import main as cli_main
from kvplane.models.layers.moe import FusedMoE
from kvplane.models.weights import WeightLoadError
from kvplane.testing.models import forward_logits, save_random_model
from tests.core.models.harness import load_tiny
from tests.core.models.moe_helpers import scale_moe_weights
from tests.core.quantization.int4_oracle import (
    assert_matches,
    dequantized_model,
    write_act_order_checkpoint,
)

GROUP_SIZE = 32
PROMPT_IDS = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26]
#: Largest |log p - log p_float| over every position and token of PROMPT_IDS allowed for
#: FP8 models (experts and projections), in nats. Measured: per-channel scales (kvplane
#: quantize) Mixtral 0.035, Qwen3-MoE 0.029; per-tensor weights with static activation
#: scales 0.068 and 0.045. The test models' experts have unit gain and decisive routers
#: (scale_moe_weights), so rounding reaches the logits undamped.
FP8_LOGPROB_TOLERANCE = 0.1
COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    num_experts_per_tok=2,
    tie_word_embeddings=False,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)
CONFIGS = {
    "mixtral": lambda: MixtralConfig(
        intermediate_size=32, num_hidden_layers=2, num_local_experts=4, **COMMON
    ),
    # Layer 1 is a dense MLP: its projections are quantized as a Llama's.
    "qwen3_moe": lambda: Qwen3MoeConfig(
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_experts=4,
        mlp_only_layers=[1],
        norm_topk_prob=True,
        head_dim=16,
        **COMMON,
    ),
}
#: A checkpoint name of an expert matrix of each architecture, without ``.weight``.
EXPERT = {
    "mixtral": "model.layers.{layer}.block_sparse_moe.experts.{expert}.{matrix}",
    "qwen3_moe": "model.layers.{layer}.mlp.experts.{expert}.{matrix}",
}
MATRIX_NAMES = {"mixtral": ("w1", "w3", "w2"), "qwen3_moe": ("gate_proj", "up_proj", "down_proj")}


def expert_name(architecture: str, layer: int, expert: int, matrix: int) -> str:
    names = MATRIX_NAMES[architecture]
    return EXPERT[architecture].format(layer=layer, expert=expert, matrix=names[matrix])


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def architecture(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def float_dir(architecture: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp(architecture)
    model = save_random_model(CONFIGS[architecture](), directory)
    scale_moe_weights(model)
    model.save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def float_logprobs(float_dir: Path) -> torch.Tensor:
    return logprobs(load_tiny(float_dir))


def logprobs(llm: LLM) -> torch.Tensor:  # [len(PROMPT_IDS), vocab_size]
    return torch.log_softmax(forward_logits(llm, PROMPT_IDS).float(), dim=-1)


def experts_of(llm: LLM) -> list[FusedMoE]:
    layers = llm.engine.runner.model.model.layers
    return [layer.mlp for layer in layers if isinstance(layer.mlp, FusedMoE)]


def quantize(float_dir: Path, target: Path, method: str) -> dict[str, torch.Tensor]:
    args = ["quantize", str(float_dir), str(target), "--method", method]
    assert cli_main([*args, "--group-size", str(GROUP_SIZE)]) == 0
    return load_file(str(target / "model.safetensors"))


# -- W4A16 --------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_int4_experts_match_transformers_on_their_dequantized_weights(
    method: str, architecture: str, float_dir: Path, tmp_path: Path
) -> None:
    tensors = quantize(float_dir, tmp_path / method, method)
    # Each expert's own tensors, as AutoGPTQ / AutoAWQ write them; the router stays float.
    down = expert_name(architecture, 0, 3, 2)
    assert tensors[f"{down}.qweight"].shape == ((32, 64 // 8) if method == "awq" else (4, 64))
    assert tensors[f"{down}.scales"].dtype == torch.float16
    assert f"{down}.weight" not in tensors
    router = "block_sparse_moe.gate" if architecture == "mixtral" else "mlp.gate"
    assert tensors[f"model.layers.0.{router}.weight"].dtype == torch.float32

    assert all(moe.quant_method.name == method for moe in experts_of(load_tiny(tmp_path / method)))
    assert_matches(tmp_path / method, dequantized_model(tmp_path / method, tmp_path / "oracle"))


def test_gptq_act_order_experts_match_their_dequantized_weights(
    architecture: str, float_dir: Path, tmp_path: Path
) -> None:
    write_act_order_checkpoint(float_dir, tmp_path / "act-order", GROUP_SIZE)
    llm = load_tiny(tmp_path / "act-order")
    assert experts_of(llm)[0].w13_experts[1].g_idx is not None  # scattered groups kept
    oracle = dequantized_model(tmp_path / "act-order", tmp_path / "oracle")
    assert_matches(tmp_path / "act-order", oracle)


# -- FP8 ----------------------------------------------------------------------------------


def test_fp8_experts_stay_close_to_float(
    architecture: str, float_dir: Path, float_logprobs: torch.Tensor, tmp_path: Path
) -> None:
    tensors = quantize(float_dir, tmp_path / "fp8", "fp8")
    gate = expert_name(architecture, 0, 2, 0)
    assert tensors[f"{gate}.weight"].dtype == torch.float8_e4m3fn
    assert tensors[f"{gate}.weight_scale"].shape == (32, 1)  # compressed-tensors channel
    declared = json.loads((tmp_path / "fp8" / "config.json").read_text())["quantization_config"]
    assert not any("experts" in pattern for pattern in declared["ignore"])

    written = load_tiny(tmp_path / "fp8")
    assert all(moe.quant_method.name == "fp8" for moe in experts_of(written))
    error = (logprobs(written) - float_logprobs).abs().max().item()
    assert 0 < error <= FP8_LOGPROB_TOLERANCE, error
    # Quantized at load: per-channel scales and the same rounding, the same model.
    at_load = logprobs(load_tiny(float_dir, quantization="fp8"))
    torch.testing.assert_close(at_load, logprobs(written), rtol=0, atol=1e-5)


def _fp8_per_tensor_checkpoint(float_dir: Path, target: Path) -> dict[str, torch.Tensor]:
    """The ``fp8`` layout with static activation scales (AutoFP8, vLLM's Mixtral FP8
    checkpoints): per-tensor ``weight_scale`` and ``input_scale`` per matrix, experts
    included."""
    target.mkdir()
    tensors = load_file(str(float_dir / "model.safetensors"))
    for name in [n for n in tensors if n.endswith("_proj.weight") or ".experts." in n]:
        weight = tensors.pop(name)
        prefix = name.removesuffix(".weight")
        scale = weight.abs().max() / 448.0
        tensors[name] = (weight / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
        tensors[f"{prefix}.weight_scale"] = scale.reshape(())
        tensors[f"{prefix}.input_scale"] = torch.tensor(0.02 + 0.001 * (len(tensors) % 7))
    save_file(tensors, str(target / "model.safetensors"))
    config = json.loads((float_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "static"}
    (target / "config.json").write_text(json.dumps(config))
    return tensors


def test_fp8_per_tensor_static_experts(
    architecture: str, float_dir: Path, float_logprobs: torch.Tensor, tmp_path: Path
) -> None:
    tensors = _fp8_per_tensor_checkpoint(float_dir, tmp_path / "fp8")
    llm = load_tiny(tmp_path / "fp8")
    gate_up = experts_of(llm)[0].w13_experts[1]
    gate, up = (expert_name(architecture, 0, 1, matrix) for matrix in (0, 1))
    scales = torch.stack([tensors[f"{gate}.weight_scale"], tensors[f"{up}.weight_scale"]])
    assert torch.equal(gate_up.weight_scale, scales.repeat_interleave(32))
    inputs = torch.stack([tensors[f"{gate}.input_scale"], tensors[f"{up}.input_scale"]])
    assert torch.equal(gate_up.input_scale, inputs.max().reshape(1))
    error = (logprobs(llm) - float_logprobs).abs().max().item()
    assert error <= FP8_LOGPROB_TOLERANCE, error


# -- broken and older checkpoints ---------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("drop", r"checkpoint lacks expert tensors: \['{name}'\]"),
        ("reshape", r"checkpoint tensor {name}: shape mismatch for weight_scale"),
    ],
)
def test_inconsistent_experts_name_the_layer_and_the_field(
    change: str, message: str, architecture: str, float_dir: Path, tmp_path: Path
) -> None:
    tensors = quantize(float_dir, tmp_path / "fp8", "fp8")
    name = f"{expert_name(architecture, 0, 2, 1)}.weight_scale"
    if change == "drop":
        del tensors[name]
    else:
        tensors[name] = tensors[name][:-1].contiguous()
    save_file(tensors, str(tmp_path / "fp8" / "model.safetensors"))
    with pytest.raises(WeightLoadError, match=message.format(name=name.replace(".", r"\."))):
        load_tiny(tmp_path / "fp8")


def test_checkpoints_that_keep_experts_in_float_still_load(
    architecture: str, float_dir: Path, float_logprobs: torch.Tensor, tmp_path: Path
) -> None:
    # What kvplane quantize wrote before experts were quantized: float experts, ignored.
    tensors = quantize(float_dir, tmp_path / "fp8", "fp8")
    float_tensors = load_file(str(float_dir / "model.safetensors"))
    for name in [n for n in tensors if ".experts." in n]:
        del tensors[name]
    tensors.update({n: t for n, t in float_tensors.items() if ".experts." in n})
    save_file(tensors, str(tmp_path / "fp8" / "model.safetensors"))
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())
    config["quantization_config"]["ignore"].append("re:.*experts.*")
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(config))
    llm = load_tiny(tmp_path / "fp8")
    assert all(moe.quant_method is None for moe in experts_of(llm))
    error = (logprobs(llm) - float_logprobs).abs().max().item()
    assert error <= FP8_LOGPROB_TOLERANCE, error
