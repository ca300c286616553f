"""Mixture-of-experts experts through the CUDA platform's quantization methods: their
own products (``torch._scaled_mm`` for FP8, the Triton W4A16 kernel where CUDA offers
one) run for every expert, and give what the core's torch methods give."""

from __future__ import annotations

import pytest
import torch

from kvplane.plugins.types import ExpertQuantSpec
from kvplane.quantization.base import QuantMethod
from kvplane.quantization.fp8 import Fp8Method
from kvplane.quantization.w4a16 import AwqMethod, GptqMethod
from kvplane_cuda.quantization import ScaledMmFp8Method, cuda_quant_methods
from tests.platforms.cuda.devices import DEVICES

NUM_EXPERTS, HIDDEN, INTERMEDIATE, TOP_K = 4, 128, 128, 2


def _experts(
    method: QuantMethod,
    spec: ExpertQuantSpec,
    w13: torch.Tensor,  # [num_experts, 2 * intermediate, hidden]
    w2: torch.Tensor,  # [num_experts, hidden, intermediate]
    device: str,
) -> torch.nn.Module:
    """The experts of a float checkpoint, quantized at load by ``method``."""
    ok, reason = method.can_implement_experts(spec)
    assert ok, reason
    layer = torch.nn.Module()
    with torch.device(device):
        method.create_expert_weights(layer, spec)
    for expert in range(spec.num_experts):
        gate, up = w13[expert].chunk(2)
        for shard, matrix in (("gate", gate), ("up", up), ("down", w2[expert])):
            method.load_expert_tensor(layer, "weight", matrix.to(device), expert, shard)
    method.process_expert_weights_after_loading(layer)
    return layer


def _inputs(
    dtype: torch.dtype, generator: torch.Generator, num_tokens: int = 9
) -> tuple[torch.Tensor, ...]:
    w13 = torch.randn(NUM_EXPERTS, 2 * INTERMEDIATE, HIDDEN, generator=generator) * HIDDEN**-0.5
    w2 = torch.randn(NUM_EXPERTS, HIDDEN, INTERMEDIATE, generator=generator) * INTERMEDIATE**-0.5
    hidden = torch.randn(num_tokens, HIDDEN, generator=generator)
    logits = torch.randn(num_tokens, NUM_EXPERTS, generator=generator)
    topk_weights, topk_ids = logits.softmax(dim=-1).topk(TOP_K, dim=-1)
    return w13.to(dtype), w2.to(dtype), hidden.to(dtype), topk_weights, topk_ids


def _run(
    method: QuantMethod, layer: torch.nn.Module, inputs: tuple[torch.Tensor, ...], device: str
) -> torch.Tensor:
    _, _, hidden, topk_weights, topk_ids = (t.to(device) for t in inputs)
    return method.apply_experts(layer, hidden, topk_weights, topk_ids, "silu").cpu()


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_experts_through_scaled_mm_match_the_torch_method(
    device: str, generator: torch.Generator
) -> None:
    spec = ExpertQuantSpec("fp8", NUM_EXPERTS, HIDDEN, INTERMEDIATE, torch.bfloat16)
    inputs = _inputs(torch.bfloat16, generator)
    w13, w2 = inputs[:2]
    method, reference = ScaledMmFp8Method(), Fp8Method()
    actual = _run(method, _experts(method, spec, w13, w2, device), inputs, device)
    expected = _run(reference, _experts(reference, spec, w13, w2, device), inputs, device)
    assert actual.dtype == torch.bfloat16 and actual.shape == (9, HIDDEN)
    # As for one layer (test_cuda_quantization.py): the reference rounds the unscaled
    # product to bfloat16 before scaling, the FP8 matmul after; twice here.
    atol = 0.04 * expected.float().abs().max().item()
    torch.testing.assert_close(actual.float(), expected.float(), rtol=0.04, atol=atol)


def test_scaled_mm_refuses_experts_it_cannot_multiply() -> None:
    spec = ExpertQuantSpec("fp8", NUM_EXPERTS, HIDDEN, 40, torch.bfloat16)
    ok, reason = ScaledMmFp8Method().can_implement_experts(spec)
    assert not ok and reason.startswith("expert down matrix: ") and "multiples of 16" in reason
    assert Fp8Method().can_implement_experts(spec) == (True, "")  # the torch one serves


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reference", [GptqMethod(), AwqMethod()], ids=["gptq", "awq"])
def test_int4_experts_through_cuda_methods_match_the_torch_method(
    device: str, reference: QuantMethod, generator: torch.Generator
) -> None:
    offered = [m for m in cuda_quant_methods() if m.name == reference.name]
    if not offered:
        pytest.skip(f"CUDA offers no {reference.name} method of its own")
    method = max(offered, key=lambda m: m.priority)
    spec = ExpertQuantSpec(reference.name, NUM_EXPERTS, HIDDEN, INTERMEDIATE, torch.float32)
    inputs = _inputs(torch.float32, generator)
    w13, w2 = inputs[:2]
    actual = _run(method, _experts(method, spec, w13, w2, device), inputs, device)
    expected = _run(reference, _experts(reference, spec, w13, w2, device), inputs, device)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
