"""Conformance: the platform's ``fused_moe`` matches :mod:`kvplane.ops.reference`.

Inputs are drawn on the CPU and routed as a softmax router would; the platform gets
copies on its device, the reference the CPU originals. Tolerances are those of matmuls.
"""

from __future__ import annotations

import pytest
import torch

from kvplane.ops import reference
from kvplane.plugins import Platform
from kvplane.testing.helpers import MATMUL_TOLERANCES, assert_close, randn

# (num_tokens, hidden_size, intermediate_size, num_experts, top_k)
MOE_SHAPES = [(1, 64, 32, 4, 2), (7, 128, 96, 8, 2), (33, 256, 128, 16, 4), (50, 64, 64, 8, 1)]


def _moe_inputs(
    num_tokens: int,
    hidden_size: int,
    intermediate_size: int,
    num_experts: int,
    top_k: int,
    dtype: torch.dtype,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random ``(hidden, w13, w2, topk_weights, topk_ids)``, routed as a softmax router would."""
    hidden = randn((num_tokens, hidden_size), dtype, generator)
    # Scaled so every stage stays of order one (as in a trained model).
    w13 = randn(
        (num_experts, 2 * intermediate_size, hidden_size), dtype, generator, scale=hidden_size**-0.5
    )
    w2 = randn(
        (num_experts, hidden_size, intermediate_size),
        dtype,
        generator,
        scale=intermediate_size**-0.5,
    )
    router_logits = randn((num_tokens, num_experts), torch.float32, generator, scale=2.0)
    topk_weights, topk_ids = router_logits.softmax(dim=-1).topk(top_k, dim=-1)
    return hidden, w13, w2, topk_weights, topk_ids


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize(
    ("num_tokens", "hidden_size", "intermediate_size", "num_experts", "top_k"), MOE_SHAPES
)
def test_fused_moe(
    kvplane_platform: Platform,
    kvplane_device: torch.device,
    kvplane_dtype: torch.dtype,
    kvplane_generator: torch.Generator,
    num_tokens: int,
    hidden_size: int,
    intermediate_size: int,
    num_experts: int,
    top_k: int,
    activation: str,
) -> None:
    inputs = _moe_inputs(
        num_tokens,
        hidden_size,
        intermediate_size,
        num_experts,
        top_k,
        kvplane_dtype,
        kvplane_generator,
    )
    device_inputs = [tensor.to(kvplane_device, copy=True) for tensor in inputs]
    out = kvplane_platform.ops.fused_moe(*device_inputs, activation)
    assert out.shape == (num_tokens, hidden_size) and out.dtype == kvplane_dtype
    assert_close(out, reference.fused_moe(*inputs, activation), MATMUL_TOLERANCES)
    for name, device_tensor, tensor in zip(
        ("hidden", "w13", "w2", "topk_weights", "topk_ids"), device_inputs, inputs, strict=True
    ):
        assert torch.equal(device_tensor.cpu(), tensor), f"fused_moe must not mutate {name}"


def test_fused_moe_with_skewed_routing(
    kvplane_platform: Platform,
    kvplane_device: torch.device,
    kvplane_dtype: torch.dtype,
    kvplane_generator: torch.Generator,
) -> None:
    # Every token picks expert 5 first; experts 0 and 7 get no token at all.
    hidden, w13, w2, _, _ = _moe_inputs(40, 64, 32, 8, 2, kvplane_dtype, kvplane_generator)
    second = torch.randint(1, 5, (40,), generator=kvplane_generator)
    topk_ids = torch.stack((torch.full((40,), 5), second), dim=1)  # [40, 2]
    topk_weights = torch.rand(40, 2, generator=kvplane_generator)
    inputs = (hidden, w13, w2, topk_weights, topk_ids)
    out = kvplane_platform.ops.fused_moe(*(t.to(kvplane_device, copy=True) for t in inputs))
    assert_close(out, reference.fused_moe(*inputs), MATMUL_TOLERANCES)


def test_fused_moe_single_expert_is_its_dense_mlp(
    kvplane_platform: Platform,
    kvplane_device: torch.device,
    kvplane_generator: torch.Generator,
) -> None:
    # Independent of the reference: top-1 routing with weight 1 is one SwiGLU MLP.
    hidden, w13, w2, _, _ = _moe_inputs(9, 64, 32, 4, 1, torch.float32, kvplane_generator)
    topk_ids = torch.full((9, 1), 2, dtype=torch.int64)
    topk_weights = torch.ones(9, 1)
    gate, up = (hidden @ w13[2].T).chunk(2, dim=-1)
    expected = (torch.nn.functional.silu(gate) * up) @ w2[2].T
    out = kvplane_platform.ops.fused_moe(
        *(t.to(kvplane_device, copy=True) for t in (hidden, w13, w2, topk_weights, topk_ids))
    )
    assert_close(out, expected, MATMUL_TOLERANCES)
