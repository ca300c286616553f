"""The reference ``fused_moe`` against a per-token loop written straight from its definition."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvplane.ops import reference

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def _inputs(
    num_tokens: int, num_experts: int, top_k: int, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, 48, generator=generator)
    w13 = torch.randn(num_experts, 2 * 24, 48, generator=generator) / 7
    w2 = torch.randn(num_experts, 48, 24, generator=generator) / 5
    probs = torch.randn(num_tokens, num_experts, generator=generator).softmax(dim=-1)
    topk_weights, topk_ids = probs.topk(top_k, dim=-1)
    return hidden, w13, w2, topk_weights, topk_ids


def _per_token(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str,
) -> torch.Tensor:  # float64
    out = torch.zeros(hidden.shape, dtype=torch.float64)
    for token in range(hidden.shape[0]):
        x = hidden[token].double()
        for weight, expert in zip(topk_weights[token], topk_ids[token], strict=True):
            gate, up = (w13[expert].double() @ x).chunk(2)
            out[token] += weight.double() * (
                w2[expert].double() @ (ACTIVATIONS[activation](gate) * up)
            )
    return out


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize(
    ("num_tokens", "num_experts", "top_k"), [(1, 4, 2), (13, 8, 3), (30, 6, 1)]
)
def test_matches_the_per_token_definition(
    num_tokens: int, num_experts: int, top_k: int, activation: str
) -> None:
    inputs = _inputs(num_tokens, num_experts, top_k)
    before = [tensor.clone() for tensor in inputs]
    out = reference.fused_moe(*inputs, activation)
    assert out.dtype == torch.float32 and out.shape == (num_tokens, 48)
    torch.testing.assert_close(out.double(), _per_token(*inputs, activation), atol=1e-5, rtol=1e-5)
    for tensor, original in zip(inputs, before, strict=True):
        assert torch.equal(tensor, original)


def test_bfloat16_rounds_like_the_dense_mlp_and_sums_in_float32() -> None:
    hidden, w13, w2, topk_weights, topk_ids = _inputs(11, 4, 2)
    hidden, w13, w2 = hidden.bfloat16(), w13.bfloat16(), w2.bfloat16()
    out = reference.fused_moe(hidden, w13, w2, topk_weights, topk_ids)
    expected = torch.zeros(11, 48)
    for token in range(11):
        for weight, expert in zip(topk_weights[token], topk_ids[token], strict=True):
            gate_up = F.linear(hidden[token : token + 1], w13[expert])
            mlp = F.linear(reference.silu_and_mul(gate_up), w2[expert])
            expected[token] += weight * mlp[0].float()
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected.bfloat16(), atol=0, rtol=0)


def test_no_tokens() -> None:
    hidden, w13, w2, topk_weights, topk_ids = _inputs(0, 4, 2)
    assert reference.fused_moe(hidden, w13, w2, topk_weights, topk_ids).shape == (0, 48)


def test_bad_arguments_say_what_is_wrong() -> None:
    hidden, w13, w2, topk_weights, topk_ids = _inputs(5, 4, 2)
    with pytest.raises(ValueError, match="activation 'relu'"):
        reference.fused_moe(hidden, w13, w2, topk_weights, topk_ids, "relu")
    with pytest.raises(ValueError, match="expert ids >= num_experts"):
        reference.fused_moe(hidden, w13, w2, topk_weights, topk_ids + 3)
