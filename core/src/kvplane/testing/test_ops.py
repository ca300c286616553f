"""Conformance: every op of the platform's table matches :mod:`kvplane.ops.reference`.

Inputs are drawn on the CPU, copied to the device for the platform's op, and the CPU
copies go through the reference. Ops that may work in place get their own copies.
"""

from __future__ import annotations

import math

import pytest
import torch

from kvplane.ops import OP_NAMES, reference
from kvplane.plugins import Platform
from kvplane.testing.helpers import assert_close, randn, rope_cos_sin_cache

TOKEN_HIDDEN_SHAPES = [(1, 64), (7, 640), (33, 4096)]


def test_op_table_is_complete(kvplane_platform: Platform) -> None:
    for name in OP_NAMES:
        assert callable(getattr(kvplane_platform.ops, name)), name


# -- norms and activations -------------------------------------------------------------


@pytest.mark.parametrize(("num_tokens", "hidden_size"), TOKEN_HIDDEN_SHAPES)
def test_rms_norm(
    kvplane_platform: Platform,
    kvplane_device: torch.device,
    kvplane_dtype: torch.dtype,
    kvplane_generator: torch.Generator,
    num_tokens: int,
    hidden_size: int,
) -> None:
    x = randn((num_tokens, hidden_size), kvplane_dtype, kvplane_generator, scale=2.0)
    weight = randn((hidden_size,), kvplane_dtype, kvplane_generator)
    eps = 1e-5
    x_device, weight_device = x.to(kvplane_device, copy=True), weight.to(kvplane_device, copy=True)
    out = kvplane_platform.ops.rms_norm(x_device, weight_device, eps)
    assert out.dtype == kvplane_dtype and out.shape == x.shape
    assert_close(out, reference.rms_norm(x, weight, eps))
    assert torch.equal(x_device.cpu(), x), "rms_norm must not mutate its input"


@pytest.mark.parametrize(("num_tokens", "num_heads", "head_size"), [(1, 2, 64), (9, 16, 128)])
def test_rms_norm_of_heads_sliced_from_a_fused_projection(
    kvplane_platform: Platform,
    kvplane_device: torch.device,
    kvplane_dtype: torch.dtype,
    kvplane_generator: torch.Generator,
    num_tokens: int,
    num_heads: int,
    head_size: int,
) -> None:
    """Per-head norms (Qwen3's q/k norm) take ``[tokens, heads, head_size]`` views of a
    fused QKV output: rows strided in two dims, which no 2-D view covers."""
    width = num_heads * head_size
    fused = randn((num_tokens, 3 * width), kvplane_dtype, kvplane_generator, scale=2.0)
    weight = randn((head_size,), kvplane_dtype, kvplane_generator)
    fused_device = fused.to(kvplane_device, copy=True)
    heads = fused_device[:, width : 2 * width].unflatten(-1, (num_heads, head_size))
    out = kvplane_platform.ops.rms_norm(heads, weight.to(kvplane_device, copy=True), 1e-6)
    assert out.shape == (num_tokens, num_heads, head_size) and out.dtype == kvplane_dtype
    expected_input = fused[:, width : 2 * width].unflatten(-1, (num_heads, head_size))
    assert_close(out, reference.rms_norm(expected_input, weight, 1e-6))
    assert torch.equal(fused_device.cpu(), fused), "rms_norm must not mutate its input"


@pytest.mark.parametrize(("num_tokens", "hidden_size"), TOKEN_HIDDEN_SHAPES)
def test_fused_add_rms_norm(
    kvplane_platform: Platform,
    kvplane_device: torch.device,
    kvplane_dtype: torch.dtype,
    kvplane_generator: torch.Generator,
    num_tokens: int,
    hidden_size: int,
) -> None:
    x = randn((num_tokens, hidden_size), kvplane_dtype, kvplane_generator)
    residual = randn((num_tokens, hidden_size), kvplane_dtype, kvplane_generator)
    weight = randn((hidden_size,), kvplane_dtype, kvplane_generator)
    eps = 1e-6
    out, new_residual = kvplane_platform.ops.fused_add_rms_norm(
        x.to(kvplane_device, copy=True),
        residual.to(kvplane_device, copy=True),
        weight.to(kvplane_device, copy=True),
        eps,
    )
    expected_out, expected_residual = reference.fused_add_rms_norm(
        x.clone(), residual.clone(), weight, eps
    )
    assert out.dtype == kvplane_dtype and new_residual.dtype == kvplane_dtype
    assert_close(new_residual, expected_residual, message="residual output")
    assert_close(out, expected_out, message="normalised output")


@pytest.mark.parametrize(("num_tokens", "hidden_size"), TOKEN_HIDDEN_SHAPES)
def test_silu_and_mul(
    kvplane_platform: Platform,
    kvplane_device: torch.device,
    kvplane_dtype: torch.dtype,
    kvplane_generator: torch.Generator,
    num_tokens: int,
    hidden_size: int,
) -> None:
    x = randn((num_tokens, 2 * hidden_size), kvplane_dtype, kvplane_generator, scale=3.0)
    out = kvplane_platform.ops.silu_and_mul(x.to(kvplane_device, copy=True))
    assert out.shape == (num_tokens, hidden_size) and out.dtype == kvplane_dtype
    assert_close(out, reference.silu_and_mul(x))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize(("num_tokens", "hidden_size"), TOKEN_HIDDEN_SHAPES)
def test_gelu_and_mul(
    kvplane_platform: Platform,
    kvplane_device: torch.device,
    kvplane_dtype: torch.dtype,
    kvplane_generator: torch.Generator,
    num_tokens: int,
    hidden_size: int,
    approximate: str,
) -> None:
    x = randn((num_tokens, 2 * hidden_size), kvplane_dtype, kvplane_generator, scale=3.0)
    out = kvplane_platform.ops.gelu_and_mul(x.to(kvplane_device, copy=True), approximate)
    assert out.shape == (num_tokens, hidden_size) and out.dtype == kvplane_dtype
    assert_close(out, reference.gelu_and_mul(x, approximate))


# -- rotary embedding ------------------------------------------------------------------

# (num_tokens, num_heads, num_kv_heads, head_size, rotary_dim)
ROTARY_SHAPES = [
    (5, 4, 4, 64, 64),
    (17, 8, 2, 128, 128),
    (9, 4, 1, 128, 64),  # partial rotary (e.g. GLM / Phi)
    (3, 2, 2, 80, 32),  # partial rotary on an odd head size
]


@pytest.mark.parametrize("is_neox_style", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize(
    ("num_tokens", "num_heads", "num_kv_heads", "head_size", "rotary_dim"), ROTARY_SHAPES
)
def test_rotary_embedding(
    kvplane_platform: Platform,
    kvplane_device: torch.device,
    kvplane_dtype: torch.dtype,
    kvplane_generator: torch.Generator,
    num_tokens: int,
    num_heads: int,
    num_kv_heads: int,
    head_size: int,
    rotary_dim: int,
    is_neox_style: bool,
) -> None:
    max_position = 4096
    positions = torch.randint(0, max_position, (num_tokens,), generator=kvplane_generator)
    query = randn((num_tokens, num_heads, head_size), kvplane_dtype, kvplane_generator)
    key = randn((num_tokens, num_kv_heads, head_size), kvplane_dtype, kvplane_generator)
    cos_sin_cache = rope_cos_sin_cache(max_position, rotary_dim, kvplane_dtype)
    out_query, out_key = kvplane_platform.ops.rotary_embedding(
        positions.to(kvplane_device, copy=True),
        query.to(kvplane_device, copy=True),
        key.to(kvplane_device, copy=True),
        cos_sin_cache.to(kvplane_device, copy=True),
        is_neox_style,
    )
    expected_query, expected_key = reference.rotary_embedding(
        positions, query, key, cos_sin_cache, is_neox_style
    )
    assert out_query.shape == query.shape and out_key.shape == key.shape
    assert_close(out_query, expected_query, message="rotated query")
    assert_close(out_key, expected_key, message="rotated key")
    if rotary_dim < head_size:
        # Channels past rotary_dim pass through untouched, bit for bit.
        assert torch.equal(out_query[..., rotary_dim:].cpu(), query[..., rotary_dim:])


def test_rotary_embedding_position_zero_is_identity(
    kvplane_platform: Platform,
    kvplane_device: torch.device,
    kvplane_dtypes: tuple[torch.dtype, ...],
    kvplane_generator: torch.Generator,
) -> None:
    # Independent of the reference: the angle at position 0 is zero.
    dtype = kvplane_dtypes[0]
    query = randn((2, 2, 64), dtype, kvplane_generator, device=kvplane_device)
    key = randn((2, 1, 64), dtype, kvplane_generator, device=kvplane_device)
    cos_sin_cache = rope_cos_sin_cache(16, 64, dtype).to(kvplane_device, copy=True)
    positions = torch.zeros(2, dtype=torch.int64, device=kvplane_device)
    for is_neox_style in (True, False):
        out_query, out_key = kvplane_platform.ops.rotary_embedding(
            positions, query.clone(), key.clone(), cos_sin_cache, is_neox_style
        )
        assert_close(out_query, query)
        assert_close(out_key, key)


# -- KV-cache writes -------------------------------------------------------------------

# (num_tokens, num_blocks, block_size, num_kv_heads, head_size)
CACHE_SHAPES = [(1, 4, 16, 1, 64), (23, 6, 16, 4, 128), (40, 5, 32, 2, 64), (64, 2, 32, 8, 128)]


@pytest.mark.parametrize(
    ("num_tokens", "num_blocks", "block_size", "num_kv_heads", "head_size"), CACHE_SHAPES
)
def test_reshape_and_cache(
    kvplane_platform: Platform,
    kvplane_device: torch.device,
    kvplane_dtype: torch.dtype,
    kvplane_generator: torch.Generator,
    num_tokens: int,
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_size: int,
) -> None:
    gen = kvplane_generator
    key = randn((num_tokens, num_kv_heads, head_size), kvplane_dtype, gen)
    value = randn((num_tokens, num_kv_heads, head_size), kvplane_dtype, gen)
    kv_cache = randn((2, num_blocks, block_size, num_kv_heads, head_size), kvplane_dtype, gen)
    # Distinct random slots; about a quarter are -1 (padding tokens, skipped).
    slot_mapping = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    skipped = torch.rand(num_tokens, generator=gen) < 0.25
    slot_mapping = slot_mapping.masked_fill(skipped, -1)

    cache_device = kv_cache.to(kvplane_device, copy=True)
    kvplane_platform.ops.reshape_and_cache(
        key.to(kvplane_device, copy=True),
        value.to(kvplane_device, copy=True),
        cache_device,
        slot_mapping.to(kvplane_device, copy=True),
    )
    expected = kv_cache.clone()
    reference.reshape_and_cache(key, value, expected, slot_mapping)
    assert torch.equal(cache_device.cpu(), expected), (
        "reshape_and_cache must write exactly the valid slots and leave the others alone"
    )


# -- sampling --------------------------------------------------------------------------

SAMPLING_VARIANTS = ["plain", "top_k", "top_p", "min_p", "all"]


def _sampling_params(
    variant: str, num_seqs: int, vocab_size: int, generator: torch.Generator
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    def pick(choices: list[float]) -> torch.Tensor:
        indices = torch.randint(0, len(choices), (num_seqs,), generator=generator)
        return torch.tensor(choices)[indices]

    top_k = pick([0, -1, 1, 2, 5, 50, vocab_size, vocab_size + 7]).long()
    top_p = pick([1.0, 0.95, 0.8, 0.5, 0.1]).float()
    min_p = pick([0.0, 0.02, 0.1, 0.5]).float()
    return (
        top_k if variant in ("top_k", "all") else None,
        top_p if variant in ("top_p", "all") else None,
        min_p if variant in ("min_p", "all") else None,
    )


def _to(tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(device, copy=True)


@pytest.mark.parametrize("variant", SAMPLING_VARIANTS)
@pytest.mark.parametrize(("num_seqs", "vocab_size"), [(1, 100), (16, 1000), (9, 32000)])
def test_top_k_top_p_sample_matches_reference_exactly(
    kvplane_platform: Platform,
    kvplane_device: torch.device,
    kvplane_generator: torch.Generator,
    num_seqs: int,
    vocab_size: int,
    variant: str,
) -> None:
    gen = kvplane_generator
    logits = randn((num_seqs, vocab_size), torch.float32, gen, scale=3.0)
    probs = logits.softmax(dim=-1)
    noise = torch.empty(num_seqs, vocab_size).exponential_(generator=gen)
    top_k, top_p, min_p = _sampling_params(variant, num_seqs, vocab_size, gen)
    tokens = kvplane_platform.ops.top_k_top_p_sample(
        probs.to(kvplane_device, copy=True),
        _to(top_k, kvplane_device),
        _to(top_p, kvplane_device),
        _to(min_p, kvplane_device),
        noise.to(kvplane_device, copy=True),
    )
    expected = reference.top_k_top_p_sample(probs, top_k, top_p, min_p, noise)
    assert tokens.dtype == torch.int64 and tokens.shape == (num_seqs,)
    assert tokens.cpu().tolist() == expected.tolist(), "same noise must give the same tokens"


def test_top_k_top_p_sample_rows_are_independent(
    kvplane_platform: Platform, kvplane_device: torch.device, kvplane_generator: torch.Generator
) -> None:
    gen = kvplane_generator
    num_seqs, vocab_size = 6, 500
    probs = randn((num_seqs, vocab_size), torch.float32, gen, scale=2.0).softmax(dim=-1)
    noise = torch.empty(num_seqs, vocab_size).exponential_(generator=gen)
    top_k, top_p, min_p = _sampling_params("all", num_seqs, vocab_size, gen)
    assert top_k is not None and top_p is not None and min_p is not None  # "all" sets each
    sample = kvplane_platform.ops.top_k_top_p_sample
    batch = sample(*(_to(t, kvplane_device) for t in (probs, top_k, top_p, min_p, noise)))
    for row in range(num_seqs):
        single = sample(
            *(_to(t[row : row + 1], kvplane_device) for t in (probs, top_k, top_p, min_p, noise))
        )
        assert single.item() == batch[row].item(), f"row {row} depends on the rest of the batch"


SANITY_PROBS = [0.4, 0.25, 0.15, 0.1, 0.06, 0.04]


@pytest.mark.parametrize(
    ("top_k", "top_p", "min_p", "expected"),
    [
        (None, None, None, SANITY_PROBS),
        (2, None, None, [0.4 / 0.65, 0.25 / 0.65, 0, 0, 0, 0]),
        (1, None, None, [1, 0, 0, 0, 0, 0]),
        # Mass before tokens 0..3 is 0, .4, .65, .8: top-p 0.7 keeps the first three.
        (None, 0.7, None, [0.5, 0.3125, 0.1875, 0, 0, 0]),
        # min-p 0.3 keeps probabilities >= 0.12.
        (None, None, 0.3, [0.5, 0.3125, 0.1875, 0, 0, 0]),
        (3, 0.5, 0.0, [0.4 / 0.65, 0.25 / 0.65, 0, 0, 0, 0]),
    ],
    ids=["plain", "top_k_2", "top_k_1", "top_p", "min_p", "combined"],
)
def test_top_k_top_p_sample_frequencies(
    kvplane_platform: Platform,
    kvplane_device: torch.device,
    kvplane_generator: torch.Generator,
    top_k: int | None,
    top_p: float | None,
    min_p: float | None,
    expected: list[float],
) -> None:
    # An emulated platform runs its kernels in an interpreter, one row at a time: fewer
    # draws there (the exact test above still compares every row with the reference).
    num_draws = 400 if kvplane_platform.emulated else 20_000
    vocab_size = len(SANITY_PROBS)
    probs = torch.tensor(SANITY_PROBS).expand(num_draws, vocab_size).contiguous()
    noise = torch.empty(num_draws, vocab_size).exponential_(generator=kvplane_generator)

    def column(value: float | None, dtype: torch.dtype) -> torch.Tensor | None:
        if value is None:
            return None
        return torch.full((num_draws,), value, dtype=dtype, device=kvplane_device)

    tokens = kvplane_platform.ops.top_k_top_p_sample(
        probs.to(kvplane_device, copy=True),
        column(top_k, torch.int64),
        column(top_p, torch.float32),
        column(min_p, torch.float32),
        noise.to(kvplane_device, copy=True),
    )
    counts = torch.bincount(tokens.cpu(), minlength=vocab_size).float()
    frequencies = counts / num_draws
    # A frequency's standard error is at most sqrt(0.25 / num_draws); allow 4.2 of them
    # (0.015 at 20,000 draws).
    tolerance = 4.2 * math.sqrt(0.25 / num_draws)
    expected_frequencies = torch.tensor(expected, dtype=torch.float32)
    assert_close(frequencies, expected_frequencies, {torch.float32: (tolerance, 0.0)})
    assert all(counts[i] == 0 for i, p in enumerate(expected) if p == 0), counts.tolist()
