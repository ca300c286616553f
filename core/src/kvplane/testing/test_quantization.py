"""Conformance: every quantization method the platform offers computes ``F.linear``, and
every one that holds mixture-of-experts experts computes the ``fused_moe`` op.

Each offered method goes through the engine's lifecycle (``create_weights``, load float
weights, ``process_weights_after_loading``, ``apply``; for experts the ``*_experts``
hooks) and is compared with ``F.linear`` (``fused_moe``) on the float weights: the
unquantized method within matmul tolerance, quantized ones within a relative-error bound
that fits their number format.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvplane.ops import reference
from kvplane.plugins import Platform
from kvplane.plugins.types import ExpertQuantSpec, LayerQuantSpec
from kvplane.quantization.base import QuantMethod
from kvplane.testing.helpers import MATMUL_TOLERANCES, assert_close, randn

#: Largest relative error ``||y - y_ref|| / ||y_ref||`` allowed per method-name fragment
#: (first match wins); other quantized methods get :data:`DEFAULT_QUANT_ERROR_BOUND`.
QUANT_ERROR_BOUNDS: tuple[tuple[str, float], ...] = (
    ("int8", 0.03),
    ("w8a8", 0.03),
    ("fp8", 0.08),
    ("int4", 0.2),
    ("q4", 0.2),
    ("gptq", 0.2),
    ("awq", 0.2),
)
DEFAULT_QUANT_ERROR_BOUND = 0.25
UNQUANTIZED = "none"

# (input_size, output_size, has_bias)
LAYER_SHAPES = [(128, 256, False), (256, 384, True), (1024, 128, True)]


def _error_bound(method_name: str) -> float:
    for fragment, bound in QUANT_ERROR_BOUNDS:
        if fragment in method_name.lower():
            return bound
    return DEFAULT_QUANT_ERROR_BOUND


def _offered_methods(platform: Platform, spec: LayerQuantSpec) -> list[str]:
    names = platform.quant_method_names(spec)
    assert UNQUANTIZED in names, "every platform offers the unquantized method"
    return sorted(names)


def _check_method(
    platform: Platform,
    device: torch.device,
    method: QuantMethod,
    spec: LayerQuantSpec,
    generator: torch.Generator,
) -> None:
    ok, reason = method.can_implement(spec)
    assert ok is True and isinstance(reason, str), (method.name, ok, reason)
    layer = torch.nn.Module()
    with torch.device(device):
        method.create_weights(layer, spec)
    layer_weight = layer.weight
    assert isinstance(layer_weight, torch.Tensor), (method.name, type(layer_weight))
    assert tuple(layer_weight.shape) == (spec.output_size, spec.input_size)
    weight = randn((spec.output_size, spec.input_size), spec.params_dtype, generator, scale=0.05)
    bias = randn((spec.output_size,), spec.params_dtype, generator) if spec.has_bias else None
    with torch.no_grad():
        layer_weight.copy_(weight.to(layer_weight.device))
        if bias is not None:
            layer_bias = layer.bias
            assert isinstance(layer_bias, torch.Tensor), (method.name, type(layer_bias))
            layer_bias.copy_(bias.to(layer_bias.device))
    method.process_weights_after_loading(layer)

    for num_tokens in (1, 13):
        x = randn((num_tokens, spec.input_size), spec.params_dtype, generator)
        with torch.no_grad():
            y = method.apply(layer, x.to(device, copy=True))
        assert y.shape == (num_tokens, spec.output_size), (method.name, tuple(y.shape))
        assert y.dtype == spec.params_dtype, (method.name, y.dtype)
        expected = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
        if method.name == UNQUANTIZED:
            assert_close(y, expected.to(spec.params_dtype), MATMUL_TOLERANCES)
        else:
            error = (y.cpu().float() - expected).norm() / expected.norm()
            bound = _error_bound(method.name)
            assert error <= bound, (
                f"method {method.name!r}: relative error {error:.4f} exceeds {bound} for {spec}"
            )


@pytest.mark.parametrize(("input_size", "output_size", "has_bias"), LAYER_SHAPES)
def test_quant_methods_match_linear(
    kvplane_platform: Platform,
    kvplane_device: torch.device,
    kvplane_dtype: torch.dtype,
    kvplane_generator: torch.Generator,
    input_size: int,
    output_size: int,
    has_bias: bool,
) -> None:
    probe_spec = LayerQuantSpec(UNQUANTIZED, input_size, output_size, kvplane_dtype, has_bias)
    for name in _offered_methods(kvplane_platform, probe_spec):
        spec = LayerQuantSpec(name, input_size, output_size, kvplane_dtype, has_bias)
        try:
            method = kvplane_platform.quant_method(spec)
        except ValueError as error:
            # Every candidate said no, with its reason; fine unless it is the float one.
            assert name != UNQUANTIZED, f"the unquantized method must serve {spec}: {error}"
            assert str(error), "a refusal must say why"
            continue
        assert method.name == name
        _check_method(kvplane_platform, kvplane_device, method, spec, kvplane_generator)


def test_unknown_quant_method_is_refused_with_the_available_ones(
    kvplane_platform: Platform,
) -> None:
    spec = LayerQuantSpec("no-such-method", 128, 128, torch.float32)
    with pytest.raises(ValueError, match="'none'"):
        kvplane_platform.quant_method(spec)


# (num_experts, hidden_size, intermediate_size, top_k): sizes every torch method's
# defaults fit (int4 quantizes at load in groups of 128 inputs).
EXPERT_SHAPES = [(4, 256, 128, 2)]
#: An expert's bound over one linear layer's (:data:`QUANT_ERROR_BOUNDS`).
EXPERT_ERROR_FACTOR = 1.5


def _check_experts(
    method: QuantMethod,
    spec: ExpertQuantSpec,
    device: torch.device,
    generator: torch.Generator,
) -> None:
    num_experts, hidden, intermediate = spec.num_experts, spec.hidden_size, spec.intermediate_size
    dtype = spec.params_dtype
    w13 = randn((num_experts, 2 * intermediate, hidden), dtype, generator, scale=hidden**-0.5)
    w2 = randn((num_experts, hidden, intermediate), dtype, generator, scale=intermediate**-0.5)
    layer = torch.nn.Module()
    with torch.device(device):
        method.create_expert_weights(layer, spec)
    matrices = {"gate": w13[:, :intermediate], "up": w13[:, intermediate:], "down": w2}
    for expert in range(num_experts):
        for shard, stacked in matrices.items():
            assert method.expert_checkpoint_param_names(layer, shard) == ["weight"], shard
            filled = method.load_expert_tensor(
                layer, "weight", stacked[expert].to(device), expert, shard
            )
            assert filled == "weight", (method.name, filled)
    method.process_expert_weights_after_loading(layer)

    num_tokens, top_k = 13, 2
    hidden_states = randn((num_tokens, hidden), dtype, generator)
    logits = torch.randn(num_tokens, num_experts, generator=generator)
    topk_weights, topk_ids = logits.softmax(dim=-1).topk(top_k, dim=-1)
    with torch.no_grad():
        out = method.apply_experts(
            layer,
            hidden_states.to(device, copy=True),
            topk_weights.to(device),
            topk_ids.to(device),
            "silu",
        )
    assert out.shape == (num_tokens, hidden) and out.dtype == dtype, (method.name, out.shape)
    expected = reference.fused_moe(
        hidden_states.float(), w13.float(), w2.float(), topk_weights, topk_ids
    )
    error = (out.cpu().float() - expected).norm() / expected.norm()
    # An expert is two quantized products in a row (the second of a rounded input).
    bound = EXPERT_ERROR_FACTOR * _error_bound(method.name)
    assert error <= bound, (
        f"method {method.name!r}: experts' relative error {error:.4f} exceeds {bound} for {spec}"
    )


@pytest.mark.parametrize(("num_experts", "hidden", "intermediate", "top_k"), EXPERT_SHAPES)
def test_quant_methods_run_experts_like_fused_moe(
    kvplane_platform: Platform,
    kvplane_device: torch.device,
    kvplane_dtype: torch.dtype,
    kvplane_generator: torch.Generator,
    num_experts: int,
    hidden: int,
    intermediate: int,
    top_k: int,
) -> None:
    probe_spec = LayerQuantSpec(UNQUANTIZED, hidden, 2 * intermediate, kvplane_dtype)
    checked = 0
    for name in _offered_methods(kvplane_platform, probe_spec):
        if name == UNQUANTIZED:
            continue  # float experts run through the fused_moe op (test_fused_moe.py)
        spec = ExpertQuantSpec(name, num_experts, hidden, intermediate, kvplane_dtype)
        try:
            method = kvplane_platform.expert_quant_method(spec)
        except ValueError as error:
            assert str(error), "a refusal must say why"
            continue
        assert method.name == name
        _check_experts(method, spec, kvplane_device, kvplane_generator)
        checked += 1
    if checked == 0:
        pytest.skip(f"platform {kvplane_platform.name!r} runs no quantized experts")
