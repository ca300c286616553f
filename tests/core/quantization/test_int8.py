"""The core's int8 quantization against the float linear layer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvplane.plugins.types import LayerQuantSpec
from kvplane.quantization.int8 import MAX_INT_MM_INPUT_SIZE, Int8Method, quantize_per_channel


def build_layer(
    spec: LayerQuantSpec, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.nn.Module:
    """Drive a method through its lifecycle as the model's Linear layer does."""
    layer = torch.nn.Module()
    method = Int8Method()
    ok, reason = method.can_implement(spec)
    assert ok, reason
    method.create_weights(layer, spec)
    layer.weight.data.copy_(weight)
    if bias is not None:
        layer.bias.data.copy_(bias)
    method.process_weights_after_loading(layer)
    return layer


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected.float()).norm() / expected.float().norm())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("has_bias", [False, True])
@pytest.mark.parametrize("dynamic_activations", [False, True])
def test_int8_close_to_the_float_layer(
    dtype: torch.dtype,
    has_bias: bool,
    dynamic_activations: bool,
    kvplane_generator: torch.Generator,
) -> None:
    input_size, output_size = 256, 96
    options = (("dynamic_activations", True),) if dynamic_activations else ()
    spec = LayerQuantSpec("int8", input_size, output_size, dtype, has_bias, options)
    weight = (torch.randn(output_size, input_size, generator=kvplane_generator) * 0.05).to(dtype)
    weight[3] = 0.0  # an all-zero channel must not divide by zero
    bias = torch.randn(output_size, generator=kvplane_generator).to(dtype) if has_bias else None
    x = torch.randn(11, input_size, generator=kvplane_generator).to(dtype)

    layer = build_layer(spec, weight, bias)
    actual = Int8Method().apply(layer, x)
    expected = F.linear(x, weight, bias)

    assert actual.shape == expected.shape and actual.dtype == dtype
    bound = 3e-2 if dynamic_activations else 1.5e-2
    assert relative_error(actual, expected) < bound
    assert torch.isfinite(actual).all()
    # The float weight is gone; int8 (a quarter of float32) remains.
    assert not hasattr(layer, "weight")
    assert layer.weight_int8.dtype == torch.int8
    assert layer.weight_int8.shape == (output_size, input_size)
    assert layer.weight_scale.shape == (output_size,)


def test_weight_only_equals_the_dequantized_float_layer(kvplane_generator: torch.Generator) -> None:
    spec = LayerQuantSpec("int8", 64, 40, torch.float32, True)
    weight = torch.randn(40, 64, generator=kvplane_generator)
    bias = torch.randn(40, generator=kvplane_generator)
    layer = build_layer(spec, weight, bias)
    x = torch.randn(5, 64, generator=kvplane_generator)
    qweight, scale = quantize_per_channel(weight)
    dequantized = qweight.float() * scale.unsqueeze(1)
    expected = F.linear(x, dequantized, bias)
    actual = Int8Method().apply(layer, x)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)
    # Symmetric per-channel: each row's largest magnitude maps to 127.
    assert (qweight.abs().amax(dim=1) == 127).all()
    assert (weight - dequantized).abs().max() <= scale.max() / 2 + 1e-6


def test_can_implement_gives_reasons() -> None:
    method = Int8Method()
    ok, reason = method.can_implement(LayerQuantSpec("int8", 64, 64, torch.int32))
    assert not ok and "floating-point" in reason
    ok, reason = method.can_implement(
        LayerQuantSpec("int8", 64, 64, torch.float32, options=(("group_size", 128),))
    )
    assert not ok and "group_size" in reason
    big = MAX_INT_MM_INPUT_SIZE + 1
    dynamic = (("dynamic_activations", True),)
    ok, reason = method.can_implement(LayerQuantSpec("int8", big, 8, torch.float32, False, dynamic))
    assert not ok and "overflow" in reason
    assert method.can_implement(LayerQuantSpec("int8", big, 8, torch.float32)) == (True, "")
