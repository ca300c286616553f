"""Quantized mixture-of-experts experts (:mod:`kvplane.quantization.experts`) in a
:class:`FusedMoE` layer on the CPU platform: each method's experts compute what their
stored weights define, checkpoint layouts load per expert, and misfits are one error
naming the layer and the tensor."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from kvplane.models.layers.context import BuildContext
from kvplane.models.layers.moe import MIXTRAL_EXPERT_NAMES, ExpertWeightLoader, FusedMoE
from kvplane.models.weights import WeightLoadError, load_named_weights
from kvplane.ops import reference
from kvplane.plugins import select_platform
from kvplane.quantization.config import (
    QuantConfig,
    parse_checkpoint_quant_config,
    resolve_quant_config,
)
from kvplane.quantization.fp8 import quantize_rows_fp8
from kvplane.quantization.int4_packing import dequantize_awq, dequantize_gptq
from kvplane.quantization.int4_rtn import quantize_awq_rtn, quantize_gptq_rtn
from kvplane.quantization.writer import compressed_tensors_config

NUM_EXPERTS, TOP_K, HIDDEN, INTERMEDIATE = 4, 2, 64, 32
GROUP_SIZE = 32
PREFIX = "layers.0.block_sparse_moe"


def build(quantization: QuantConfig) -> torch.nn.Module:
    """A model holding one MoE layer at ``layers.0`` (checkpoint name :data:`PREFIX`)."""
    ctx = BuildContext(select_platform("cpu"), torch.float32, torch.device("cpu"), 16, quantization)
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList(
        [
            FusedMoE(
                NUM_EXPERTS,
                TOP_K,
                HIDDEN,
                INTERMEDIATE,
                "silu",
                True,
                ctx,
                prefix=PREFIX,
                expert_names=MIXTRAL_EXPERT_NAMES,
            )
        ]
    )
    return model


def load(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> FusedMoE:
    experts = ExpertWeightLoader(model, MIXTRAL_EXPERT_NAMES)
    rest = {name: t for name, t in experts.intercept(tensors.items())}
    gate = rest.pop(f"{PREFIX}.gate.weight")
    load_named_weights(model, [("layers.0.gate.weight", gate)], ())
    assert not rest, rest
    experts.loaded_names()
    moe = model.layers[0]
    moe.process_weights_after_loading()
    return moe


def float_experts(seed: int = 0) -> dict[str, torch.Tensor]:
    """A float checkpoint of the layer: router and per-expert w1 / w3 / w2."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {f"{PREFIX}.gate.weight": torch.randn(NUM_EXPERTS, HIDDEN, generator=generator)}
    for expert in range(NUM_EXPERTS):
        for name, shape in (
            ("w1", (INTERMEDIATE, HIDDEN)),
            ("w3", (INTERMEDIATE, HIDDEN)),
            ("w2", (HIDDEN, INTERMEDIATE)),
        ):
            weight = torch.randn(shape, generator=generator) * shape[1] ** -0.5
            tensors[f"{PREFIX}.experts.{expert}.{name}.weight"] = weight
    return tensors


def stacked(tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w13, w2)`` as the float ``fused_moe`` op takes them."""
    w13 = torch.stack(
        [
            torch.cat([tensors[f"{PREFIX}.experts.{e}.{n}.weight"] for n in ("w1", "w3")])
            for e in range(NUM_EXPERTS)
        ]
    )
    w2 = torch.stack([tensors[f"{PREFIX}.experts.{e}.w2.weight"] for e in range(NUM_EXPERTS)])
    return w13, w2


def routed(num_tokens: int = 11, seed: int = 1) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, HIDDEN, generator=generator)
    logits = torch.randn(num_tokens, NUM_EXPERTS, generator=generator)
    topk_weights, topk_ids = logits.softmax(dim=-1).topk(TOP_K, dim=-1)
    return hidden, topk_weights, topk_ids


def quant_config(method: str, **config: Any) -> QuantConfig:
    """``method`` quantized at load, or a checkpoint's config when ``config`` is given."""
    if config:
        return parse_checkpoint_quant_config({"quant_method": method, **config})
    return resolve_quant_config(method, object())


def fp8_w8a8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """One token's FP8 product by definition: e4m3 activations with their own scale times
    the dequantized weight, in float64."""
    x_fp8, x_scale = quantize_rows_fp8(x)
    dequantized = weight.double() * scale.double().view(-1, 1)
    return (x_fp8.double() * x_scale.double()) @ dequantized.t()


def test_fp8_experts_compute_their_per_token_definition() -> None:
    # Quantized at load: per-row weight scales, dynamic per-token activations.
    moe = load(build(quant_config("fp8")), float_experts())
    assert type(moe.quant_method).__name__ == "Fp8Method" and not hasattr(moe, "w13")
    # Grouping tokens reads per-expert counts on the host: decode steps stay eager.
    assert moe.supports_graph_capture is False
    gate_up = moe.w13_experts[2]
    assert gate_up.weight.dtype == torch.float8_e4m3fn and gate_up.weight.shape == (64, 64)

    hidden, topk_weights, topk_ids = routed()
    out = moe.quant_method.apply_experts(moe, hidden, topk_weights, topk_ids, "silu")
    expected = torch.zeros(hidden.shape, dtype=torch.float64)
    for token in range(hidden.shape[0]):
        for weight, expert in zip(topk_weights[token], topk_ids[token].tolist(), strict=True):
            w13, w2 = moe.w13_experts[expert], moe.w2_experts[expert]
            gate_up_out = fp8_w8a8(hidden[token : token + 1], w13.weight, w13.weight_scale)
            activated = reference.silu_and_mul(gate_up_out.float())
            down = fp8_w8a8(activated, w2.weight, w2.weight_scale)
            expected[token] += weight.double() * down[0]
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)
    # ... and close to the float experts the FP8 ones were rounded from.
    w13_float, w2_float = stacked(float_experts())
    float_out = reference.fused_moe(hidden, w13_float, w2_float, topk_weights, topk_ids)
    assert (out - float_out).norm() / float_out.norm() < 0.1


@pytest.mark.parametrize("layout", ["gptq", "awq", "gptq-act-order"])
def test_int4_experts_equal_fused_moe_on_their_dequantized_weights(layout: str) -> None:
    tensors = float_experts()
    generator = torch.Generator().manual_seed(5)
    for expert in range(NUM_EXPERTS):
        # Act-order: one permutation per expert input (gate and up read the same one).
        orders = {
            size: torch.randperm(size, generator=generator) for size in (HIDDEN, INTERMEDIATE)
        }
        for name in ("w1", "w3", "w2"):
            prefix = f"{PREFIX}.experts.{expert}.{name}"
            weight = tensors.pop(f"{prefix}.weight")
            if layout == "awq":
                packed = quantize_awq_rtn(weight, GROUP_SIZE)
            else:
                g_idx = None
                if layout == "gptq-act-order":
                    g_idx = torch.empty(weight.shape[1], dtype=torch.int32)
                    g_idx[orders[weight.shape[1]]] = (
                        torch.arange(weight.shape[1], dtype=torch.int32) // GROUP_SIZE
                    )
                packed = quantize_gptq_rtn(weight, GROUP_SIZE, g_idx=g_idx)
            tensors.update({f"{prefix}.{key}": t for key, t in packed.items()})
    method = layout.removesuffix("-act-order")
    config = {"bits": 4, "group_size": GROUP_SIZE, "desc_act": layout == "gptq-act-order"}
    moe = load(build(quant_config(method, **config)), tensors)
    assert moe.quant_method.name == method
    # Act-order keeps the scattered groups; sequential ones are dropped after loading.
    has_g_idx = getattr(moe.w13_experts[0], "g_idx", None) is not None
    assert has_g_idx == (layout == "gptq-act-order")

    dequantized: dict[str, torch.Tensor] = {}
    for expert in range(NUM_EXPERTS):
        for name in ("w1", "w3", "w2"):
            prefix = f"{PREFIX}.experts.{expert}.{name}"
            qweight, qzeros, scales = (
                tensors[f"{prefix}.{k}"] for k in ("qweight", "qzeros", "scales")
            )
            if method == "gptq":
                g_idx = tensors[f"{prefix}.g_idx"]
                weight = dequantize_gptq(qweight, qzeros, scales, g_idx, zeros_offset=1)
            else:
                weight = dequantize_awq(qweight, qzeros, scales, GROUP_SIZE)
            dequantized[f"{prefix}.weight"] = weight
    hidden, topk_weights, topk_ids = routed()
    out = moe.quant_method.apply_experts(moe, hidden, topk_weights, topk_ids, "silu")
    w13, w2 = stacked(dequantized)
    expected = reference.fused_moe(hidden, w13, w2, topk_weights, topk_ids)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def fp8_checkpoint(static: bool) -> tuple[dict[str, torch.Tensor], QuantConfig]:
    """The layer in the ``fp8`` layout (AutoFP8 / vLLM): per-tensor scales per expert
    matrix and, with ``static``, a per-tensor ``input_scale`` per matrix."""
    tensors = float_experts()
    for name in [n for n in tensors if ".experts." in n]:
        weight = tensors.pop(name)
        prefix = name.removesuffix(".weight")
        scale = weight.abs().max() / 448.0
        tensors[name] = (weight / scale).to(torch.float8_e4m3fn)
        tensors[f"{prefix}.weight_scale"] = scale.reshape(())
        if static:
            tensors[f"{prefix}.input_scale"] = torch.tensor([0.01 + 0.001 * len(tensors)])
    scheme = "static" if static else "dynamic"
    return tensors, quant_config("fp8", activation_scheme=scheme)


@pytest.mark.parametrize("static", [False, True])
def test_fp8_per_tensor_checkpoint_scales_stay_per_matrix(static: bool) -> None:
    tensors, config = fp8_checkpoint(static)
    moe = load(build(config), tensors)
    gate_up = moe.w13_experts[3]
    scales = [tensors[f"{PREFIX}.experts.3.{n}.weight_scale"] for n in ("w1", "w3")]
    # Gate and up keep their own scales (no requantization to a shared one).
    assert torch.equal(gate_up.weight_scale, torch.stack(scales).repeat_interleave(INTERMEDIATE))
    assert torch.equal(
        gate_up.weight, torch.cat([tensors[f"{PREFIX}.experts.3.{n}.weight"] for n in ("w1", "w3")])
    )
    if static:
        inputs = [tensors[f"{PREFIX}.experts.3.{n}.input_scale"] for n in ("w1", "w3")]
        assert torch.equal(gate_up.input_scale, torch.maximum(*inputs))
    else:
        assert gate_up.input_scale is None
    hidden, topk_weights, topk_ids = routed()
    out = moe.quant_method.apply_experts(moe, hidden, topk_weights, topk_ids, "silu")
    w13, w2 = stacked(float_experts())
    expected = reference.fused_moe(hidden, w13, w2, topk_weights, topk_ids)
    assert (out - expected).norm() / expected.norm() < 0.1


def test_compressed_tensors_channel_scales_load_per_expert() -> None:
    tensors = float_experts()
    for name in [n for n in tensors if ".experts." in n]:
        qweight, scale = quantize_rows_fp8(tensors.pop(name))
        tensors[name], tensors[name.replace(".weight", ".weight_scale")] = qweight, scale
    moe = load(build(parse_checkpoint_quant_config(compressed_tensors_config("fp8"))), tensors)
    assert torch.equal(
        moe.w2_experts[1].weight_scale, tensors[f"{PREFIX}.experts.1.w2.weight_scale"].view(-1)
    )


# -- what a layer refuses -----------------------------------------------------------------


def test_a_method_without_experts_is_refused_naming_the_layer() -> None:
    gguf = QuantConfig("gguf", (("checkpoint_format", "gguf"),))
    with pytest.raises(ValueError, match=rf"^{PREFIX}: .*gguf.*no mixture-of-experts"):
        build(gguf)


def test_missing_scale_of_one_expert_names_the_tensor() -> None:
    tensors, config = fp8_checkpoint(static=False)
    del tensors[f"{PREFIX}.experts.2.w3.weight_scale"]
    with pytest.raises(WeightLoadError, match=r"lacks expert tensors") as error:
        load(build(config), tensors)
    assert str(error.value).endswith(f"['{PREFIX}.experts.2.w3.weight_scale']")


@pytest.mark.parametrize(
    ("name", "tensor", "message"),
    [
        ("experts.1.w2.weight_scale", torch.ones(3), r"shape mismatch for weight_scale"),
        ("experts.0.w1.weight", torch.zeros(INTERMEDIATE, HIDDEN), r"weight is torch\.float32"),
        ("experts.0.w1.qweight", torch.zeros(8, 32, dtype=torch.int32), r"does not use"),
    ],
)
def test_misfit_tensors_name_the_layer_and_the_field(
    name: str, tensor: torch.Tensor, message: str
) -> None:
    tensors, config = fp8_checkpoint(static=False)
    tensors[f"{PREFIX}.{name}"] = tensor
    pattern = rf"checkpoint tensor {PREFIX}\.{name}: .*{message}"
    with pytest.raises(WeightLoadError, match=pattern):
        load(build(config), tensors)


def test_quantized_tensors_for_float_experts_are_refused() -> None:
    tensors = float_experts()
    tensors[f"{PREFIX}.experts.0.w1.weight_scale"] = torch.tensor(1.0)
    with pytest.raises(
        WeightLoadError, match=r"experts\.0\.w1\.weight_scale: .*float experts do not use"
    ):
        load(build(QuantConfig()), tensors)


def test_gate_and_up_with_different_act_orders_are_refused() -> None:
    tensors = float_experts()
    for expert in range(NUM_EXPERTS):
        for name in ("w1", "w3", "w2"):
            prefix = f"{PREFIX}.experts.{expert}.{name}"
            weight = tensors.pop(f"{prefix}.weight")
            g_idx = torch.arange(weight.shape[1], dtype=torch.int32) // GROUP_SIZE
            if (expert, name) == (1, "w3"):
                g_idx = g_idx.flip(0).contiguous()
            packed = quantize_gptq_rtn(weight, GROUP_SIZE, g_idx=g_idx)
            tensors.update({f"{prefix}.{key}": t for key, t in packed.items()})
    config = quant_config("gptq", bits=4, group_size=GROUP_SIZE, desc_act=True)
    pattern = rf"{PREFIX}\.experts\.1\.w3\.g_idx: g_idx of shard 1 differs"
    with pytest.raises(WeightLoadError, match=pattern):
        load(build(config), tensors)


# -- the checkpoint's ignore list ---------------------------------------------------------


@pytest.mark.parametrize("pattern", ["re:.*experts.*", PREFIX, "re:.*block_sparse_moe$"])
def test_experts_the_ignore_list_covers_stay_float(pattern: str) -> None:
    config = replace(quant_config("fp8"), ignored_layers=("lm_head", pattern))
    moe = load(build(config), float_experts())
    assert moe.quant_method is None and moe.w13.dtype == torch.float32
    hidden = routed()[0]
    w13, w2 = stacked(float_experts())
    out = moe(hidden)
    weights, ids = reference_routing(moe, hidden)
    torch.testing.assert_close(out, reference.fused_moe(hidden, w13, w2, weights, ids))


def reference_routing(moe: FusedMoE, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    probs = F.linear(hidden, moe.gate.weight).softmax(dim=-1)
    weights, ids = probs.topk(TOP_K, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), ids


def test_an_ignore_list_covering_some_experts_is_refused() -> None:
    config = replace(quant_config("fp8"), ignored_layers=(f"{PREFIX}.experts.1.w2",))
    with pytest.raises(
        ValueError, match=rf"^{PREFIX}: .*experts\.1\.w2 in float but not .*experts\.0\.w1"
    ):
        build(config)
