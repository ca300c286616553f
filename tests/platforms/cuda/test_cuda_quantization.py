"""The CUDA platform's FP8, GGUF and W4A16 methods against the core's torch references."""

from __future__ import annotations

import pytest
import torch

from kvplane.plugins.types import LayerQuantSpec
from kvplane.quantization import fp8 as reference
from kvplane.quantization.config import (
    OPT_ACTIVATIONS,
    OPT_CHECKPOINT,
    OPT_GROUP_SIZE,
    OPT_WEIGHT_STRATEGY,
    OPT_ZEROS_OFFSET,
)
from kvplane.quantization.gguf import GgufMethod
from kvplane.quantization.gguf_blocks import gguf_block_format
from kvplane.quantization.int4_rtn import quantize_gptq_rtn
from kvplane.quantization.w4a16 import AwqMethod, GptqMethod, Int4Method
from kvplane.testing.helpers import MATMUL_TOLERANCES, assert_close
from kvplane_cuda.quantization import (
    GGUF_KERNEL_MAX_TOKENS,
    W4A16_KERNEL_MAX_TOKENS,
    ScaledMmFp8Method,
    TritonAwqMethod,
    TritonGgufMethod,
    TritonGptqMethod,
)
from tests.core.quantization.gguf_cases import random_gguf_bytes
from tests.platforms.cuda.devices import DEVICES


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("num_rows", "num_columns"), [(1, 64), (7, 200), (33, 5000)])
def test_row_quantization_kernel_matches_torch(
    device: str, num_rows: int, num_columns: int, generator: torch.Generator
) -> None:
    from kvplane_cuda.kernels.fp8_quant import quantize_rows_fp8

    x = torch.randn(num_rows, num_columns, generator=generator) * 3
    x[0, :5] = 0.0
    x[-1, :7] = 1e-6  # codes in e4m3's subnormal range
    if num_rows > 2:
        x[2] = 0.0  # an all-zero token takes the smallest scale, not a division by zero
    q, scale = quantize_rows_fp8(x.to(device, torch.bfloat16))
    q_ref, scale_ref = reference.quantize_rows_fp8(x.to(torch.bfloat16))
    assert torch.equal(scale.cpu(), scale_ref)
    # The kernel rounds half-to-even as torch's cast does: the same codes, bit for bit.
    assert torch.equal(q.cpu().view(torch.uint8), q_ref.view(torch.uint8))


def _layer(
    method: reference.Fp8Method, spec: LayerQuantSpec, weight: torch.Tensor
) -> torch.nn.Module:
    layer = torch.nn.Module()
    method.create_weights(layer, spec)
    layer.weight.data.copy_(weight)
    if spec.has_bias:
        layer.bias.data.copy_(torch.linspace(-1, 1, spec.output_size))
    method.process_weights_after_loading(layer)
    return layer


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("has_bias", [False, True])
def test_scaled_mm_method_matches_the_reference(
    device: str, static: bool, has_bias: bool, generator: torch.Generator
) -> None:
    spec = LayerQuantSpec("fp8", 64, 48, torch.bfloat16, has_bias)
    method = ScaledMmFp8Method()
    assert method.can_implement(spec) == (True, "")
    weight = (torch.randn(48, 64, generator=generator) * 0.05).to(torch.bfloat16)
    layer = _layer(method, spec, weight).to(device)
    reference_layer = _layer(reference.Fp8Method(), spec, weight).to(device)
    if static:
        for module in (layer, reference_layer):
            module.input_scale = torch.nn.Parameter(torch.tensor([0.01], device=device))
    x = torch.randn(9, 64, generator=generator).to(device, torch.bfloat16)
    actual = method.apply(layer, x)
    expected = reference.Fp8Method().apply(reference_layer, x)
    assert actual.dtype == torch.bfloat16 and actual.shape == (9, 48)
    # The reference rounds the unscaled product to bfloat16 before scaling, the FP8
    # matmul after: a few bfloat16 steps of the largest output apart (H100: at most 0.033).
    atol = 0.02 * expected.float().abs().max().item()
    torch.testing.assert_close(actual.float(), expected.float(), rtol=0.02, atol=atol)


def test_scaled_mm_method_refuses_what_it_cannot_run() -> None:
    method = ScaledMmFp8Method()
    ok, reason = method.can_implement(LayerQuantSpec("fp8", 64, 48, torch.float32))
    assert not ok and "bfloat16" in reason
    ok, reason = method.can_implement(LayerQuantSpec("fp8", 60, 48, torch.bfloat16))
    assert not ok and "multiples of 16" in reason
    checkpoint = ((OPT_CHECKPOINT, "fp8"), (OPT_WEIGHT_STRATEGY, "tensor"))
    spec = LayerQuantSpec(
        "fp8", 64, 48, torch.bfloat16, options=(*checkpoint, (OPT_ACTIVATIONS, "static"))
    )
    assert method.can_implement(spec) == (True, "")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_tokens", [3, GGUF_KERNEL_MAX_TOKENS + 1])
def test_gguf_method_matches_the_reference(
    device: str, num_tokens: int, generator: torch.Generator
) -> None:
    # Both sides of the kernel / dequantize-then-cuBLAS split, against the core's method.
    sizes = (32, 16)
    spec = LayerQuantSpec(
        "gguf",
        64,
        sum(sizes),
        torch.float32,
        options=((OPT_CHECKPOINT, "gguf"),),
        output_sizes=sizes,
    )
    fmt = gguf_block_format("Q4_1")
    raws = [random_gguf_bytes(fmt, rows, 64, generator) for rows in sizes]
    layers = []
    for method in (TritonGgufMethod(), GgufMethod()):
        layer = torch.nn.Module()
        method.create_weights(layer, spec)
        for index, raw in enumerate(raws):
            method.load_checkpoint_tensor(layer, "gguf_Q4_1", raw.to(device), index)
        method.process_weights_after_loading(layer)
        layers.append(layer)
    x = torch.randn(num_tokens, 64, generator=generator).to(device)
    actual = TritonGgufMethod().apply(layers[0], x)
    expected = GgufMethod().apply(layers[1], x)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def _int4_layer(method: Int4Method, spec: LayerQuantSpec, weight: torch.Tensor) -> torch.nn.Module:
    """A layer of ``method`` quantized at load from the float ``weight``."""
    layer = torch.nn.Module()
    method.create_weights(layer, spec)
    layer.weight.data.copy_(weight)
    method.process_weights_after_loading(layer)
    return layer


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_tokens", [3, W4A16_KERNEL_MAX_TOKENS + 1])
@pytest.mark.parametrize(
    ("triton_method", "torch_method"),
    [(TritonGptqMethod(), GptqMethod()), (TritonAwqMethod(), AwqMethod())],
    ids=["gptq", "awq"],
)
def test_w4a16_method_matches_the_reference(
    device: str,
    num_tokens: int,
    triton_method: Int4Method,
    torch_method: Int4Method,
    generator: torch.Generator,
) -> None:
    # Both sides of the kernel / dequantize-then-cuBLAS split, against the core's method.
    sizes = (32, 64)
    options = ((OPT_CHECKPOINT, None), (OPT_GROUP_SIZE, 32))
    spec = LayerQuantSpec(
        triton_method.name, 128, sum(sizes), torch.float32, options=options, output_sizes=sizes
    )
    assert triton_method.can_implement(spec) == (True, "")
    weight = torch.randn(sum(sizes), 128, generator=generator) * 0.05
    layer = _int4_layer(triton_method, spec, weight).to(device)
    reference_layer = _int4_layer(torch_method, spec, weight).to(device)
    x = torch.randn(num_tokens, 128, generator=generator).to(device)
    actual = triton_method.apply(layer, x)
    expected = torch_method.apply(reference_layer, x)
    assert_close(actual, expected, MATMUL_TOLERANCES)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_tokens", [3, W4A16_KERNEL_MAX_TOKENS + 1])
def test_w4a16_method_runs_act_order_checkpoints(
    device: str, num_tokens: int, generator: torch.Generator
) -> None:
    # A GPTQ checkpoint with act-order keeps its g_idx, on both sides of the split.
    group_size, input_size, output_size = 32, 128, 64
    options = ((OPT_CHECKPOINT, "gptq"), (OPT_GROUP_SIZE, group_size), (OPT_ZEROS_OFFSET, 1))
    spec = LayerQuantSpec("gptq", input_size, output_size, torch.float32, options=options)
    order = torch.randperm(input_size, generator=generator)
    g_idx = torch.empty(input_size, dtype=torch.int32)
    g_idx[order] = (torch.arange(input_size) // group_size).to(torch.int32)
    weight = torch.randn(output_size, input_size, generator=generator) * 0.05
    packed = quantize_gptq_rtn(weight, group_size, sym=False, g_idx=g_idx)
    layers = []
    for method in (TritonGptqMethod(), GptqMethod()):
        layer = torch.nn.Module()
        method.create_weights(layer, spec)
        for name, tensor in packed.items():
            getattr(layer, name).data.copy_(tensor)
        method.process_weights_after_loading(layer)
        assert layer.g_idx is not None
        layers.append(layer.to(device))
    x = torch.randn(num_tokens, input_size, generator=generator).to(device)
    actual = TritonGptqMethod().apply(layers[0], x)
    expected = GptqMethod().apply(layers[1], x)
    assert_close(actual, expected, MATMUL_TOLERANCES)
