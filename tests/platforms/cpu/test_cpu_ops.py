"""CPU ops against the core's reference ops."""

from __future__ import annotations

import pytest
import torch

from kvplane.ops import OP_NAMES
from kvplane.ops import reference as ref
from kvplane.plugins import select_platform
from kvplane_cpu import ops

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOLERANCES = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}


def randn(generator: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32):
    return torch.randn(*shape, generator=generator).to(dtype)


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    tolerance = TOLERANCES[expected.dtype]
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, atol=tolerance, rtol=tolerance)


def test_every_op_is_offered_or_left_to_the_reference() -> None:
    assert set(ops.cpu_ops()) == set(OP_NAMES) - ops.REFERENCE_OPS
    assert ops.REFERENCE_OPS <= set(OP_NAMES)
    platform = select_platform("cpu")
    for name in ops.REFERENCE_OPS:
        assert getattr(platform.ops, name) is getattr(ref, name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm(dtype: torch.dtype, generator: torch.Generator) -> None:
    x = randn(generator, 7, 96, dtype=dtype)
    weight = randn(generator, 96, dtype=dtype)
    x_before = x.clone()
    assert_close(ops.rms_norm(x, weight, 1e-6), ref.rms_norm(x, weight, 1e-6))
    assert torch.equal(x, x_before)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm(dtype: torch.dtype, generator: torch.Generator) -> None:
    x, residual = randn(generator, 5, 64, dtype=dtype), randn(generator, 5, 64, dtype=dtype)
    weight = randn(generator, 64, dtype=dtype)
    expected_out, expected_sum = ref.fused_add_rms_norm(x.clone(), residual.clone(), weight, 1e-5)
    out, summed = ops.fused_add_rms_norm(x, residual, weight, 1e-5)
    assert_close(out, expected_out)
    torch.testing.assert_close(summed, expected_sum, atol=0, rtol=0)  # one rounding, same
    assert summed.data_ptr() == residual.data_ptr()  # written in place


def test_fused_add_rms_norm_with_a_float32_residual(generator: torch.Generator) -> None:
    x = randn(generator, 3, 32, dtype=torch.bfloat16)
    residual, weight = randn(generator, 3, 32), randn(generator, 32, dtype=torch.bfloat16)
    expected_out, expected_sum = ref.fused_add_rms_norm(x, residual.clone(), weight, 1e-6)
    out, summed = ops.fused_add_rms_norm(x, residual, weight, 1e-6)
    assert_close(out, expected_out)
    assert summed.dtype == torch.bfloat16
    torch.testing.assert_close(summed, expected_sum, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_neox_style", [True, False])
@pytest.mark.parametrize(("head_size", "rotary_dim"), [(64, 64), (80, 32)])
def test_rotary_embedding(
    dtype: torch.dtype,
    is_neox_style: bool,
    head_size: int,
    rotary_dim: int,
    generator: torch.Generator,
) -> None:
    inv_freq = 1.0 / 10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim)
    angles = torch.outer(torch.arange(50).float(), inv_freq)  # [50, rotary_dim // 2]
    cos_sin_cache = torch.cat((angles.cos(), angles.sin()), dim=-1).to(dtype)
    positions = torch.randint(0, 50, (9,), generator=generator)
    query = randn(generator, 9, 4, head_size, dtype=dtype)
    key = randn(generator, 9, 2, head_size, dtype=dtype)
    q_before, k_before = query.clone(), key.clone()
    expected = ref.rotary_embedding(positions, query, key, cos_sin_cache, is_neox_style)
    actual = ops.rotary_embedding(positions, query, key, cos_sin_cache, is_neox_style)
    for got, want in zip(actual, expected, strict=True):
        assert_close(got, want)
    assert torch.equal(query, q_before) and torch.equal(key, k_before)
    # The cached tables follow an in-place update of the cache.
    cos_sin_cache.mul_(0.5)
    expected = ref.rotary_embedding(positions, query, key, cos_sin_cache, is_neox_style)
    actual = ops.rotary_embedding(positions, query, key, cos_sin_cache, is_neox_style)
    assert_close(actual[0], expected[0])


def test_rotary_embedding_with_an_inference_tensor_cache(generator: torch.Generator) -> None:
    with torch.inference_mode():
        cos_sin_cache = randn(generator, 20, 16)
        positions = torch.arange(5)
        query, key = randn(generator, 5, 2, 16), randn(generator, 5, 1, 16)
        expected = ref.rotary_embedding(positions, query, key, cos_sin_cache, True)
        actual = ops.rotary_embedding(positions, query, key, cos_sin_cache, True)
    assert_close(actual[0], expected[0])
    assert_close(actual[1], expected[1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_activations(dtype: torch.dtype, generator: torch.Generator) -> None:
    x = randn(generator, 6, 2 * 48, dtype=dtype)
    assert_close(ops.silu_and_mul(x), ref.silu_and_mul(x))
    for approximate in ("none", "tanh"):
        assert_close(ops.gelu_and_mul(x, approximate), ref.gelu_and_mul(x, approximate))


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_reshape_and_cache(cache_dtype: torch.dtype, generator: torch.Generator) -> None:
    num_blocks, block_size, kv_heads, head_size = 6, 4, 2, 8
    key, value = randn(generator, 7, kv_heads, head_size), randn(generator, 7, kv_heads, head_size)
    slots = torch.randperm(num_blocks * block_size, generator=generator)[:7]
    for slot_mapping in (slots, torch.where(torch.arange(7) % 3 == 1, -1, slots)):
        cache = randn(generator, 2, num_blocks, block_size, kv_heads, head_size, dtype=cache_dtype)
        expected = cache.clone()
        ref.reshape_and_cache(key, value, expected, slot_mapping)
        ops.reshape_and_cache(key, value, cache, slot_mapping)
        assert torch.equal(cache, expected)


@pytest.mark.parametrize(("k_scale", "v_scale"), [(1.0, 1.0), (0.37, 1.7)])
def test_reshape_and_cache_into_fp8(
    k_scale: float, v_scale: float, generator: torch.Generator
) -> None:
    num_blocks, block_size, kv_heads, head_size = 6, 4, 2, 8
    key = randn(generator, 7, kv_heads, head_size) * 200  # some beyond +-448: saturated
    value = randn(generator, 7, kv_heads, head_size, dtype=torch.bfloat16)
    slots = torch.randperm(num_blocks * block_size, generator=generator)[:7]
    for slot_mapping in (slots, torch.where(torch.arange(7) % 3 == 1, -1, slots)):
        cache = randn(generator, 2, num_blocks, block_size, kv_heads, head_size)
        cache = cache.to(torch.float8_e4m3fn)
        expected = cache.clone()
        ref.reshape_and_cache(key, value, expected, slot_mapping, k_scale, v_scale)
        ops.reshape_and_cache(key, value, cache, slot_mapping, k_scale, v_scale)
        assert not cache.float().isnan().any()
        assert torch.equal(cache.view(torch.uint8), expected.view(torch.uint8))


def _sample_inputs(generator: torch.Generator, num_seqs: int, vocab_size: int):
    logits = randn(generator, num_seqs, vocab_size) * 3
    logits[0, :4] = 5.0  # ties at the top
    probs = logits.softmax(dim=-1)
    noise = torch.empty(num_seqs, vocab_size).exponential_(generator=generator)
    return probs, noise


@pytest.mark.parametrize("use_top_p", [False, True])
@pytest.mark.parametrize("use_min_p", [False, True])
def test_top_k_top_p_sample_matches_reference(
    use_top_p: bool, use_min_p: bool, generator: torch.Generator
) -> None:
    num_seqs, vocab_size = 8, 300
    top_k = torch.tensor([2, 0, 50, 300, 1, 7, -1, 1000])  # includes "no limit" rows
    top_p = torch.tensor([0.9, 1.0, 0.5, 0.2, 1.0, 0.95, 0.7, 0.3]) if use_top_p else None
    min_p = torch.tensor([0.0, 0.1, 0.0, 0.05, 0.2, 0.0, 0.3, 0.0]) if use_min_p else None
    for _ in range(20):
        probs, noise = _sample_inputs(generator, num_seqs, vocab_size)
        for k in (top_k, None):
            expected = ref.top_k_top_p_sample(probs, k, top_p, min_p, noise)
            actual = ops.top_k_top_p_sample(probs, k, top_p, min_p, noise)
            assert torch.equal(actual, expected)


def test_top_k_alone_sorts_nothing(
    monkeypatch: pytest.MonkeyPatch, generator: torch.Generator
) -> None:
    probs, noise = _sample_inputs(generator, 4, 200)
    top_k = torch.tensor([3, 1, 0, 40])
    expected = ref.top_k_top_p_sample(probs, top_k, None, None, noise)

    def no_sort(*args: object, **kwargs: object) -> None:
        raise AssertionError("top-k alone must not sort the vocabulary")

    monkeypatch.setattr(torch.Tensor, "sort", no_sort)
    actual = ops.top_k_top_p_sample(probs, top_k, None, None, noise)
    assert torch.equal(actual, expected)
    # With k = 1 the sample is the most probable token, whatever the noise.
    assert actual[1] == probs[1].argmax()
