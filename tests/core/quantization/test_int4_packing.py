"""The int4 GPTQ/AWQ layouts: bit order pinned by hand-built words, round-to-nearest round
trips, act-order, the v1/v2 zero offset, the torch reference linear, and shape errors."""

from __future__ import annotations

import pytest
import torch

from kvplane.quantization import int4_packing
from kvplane.quantization.int4_packing import (
    AWQ_NIBBLE_ORDER,
    GPTQ_NIBBLE_ORDER,
    check_w4a16_shapes,
    dequantize_awq,
    dequantize_gptq,
    is_sequential_g_idx,
    pack_int4,
    sequential_g_idx,
    unpack_int4,
    w4a16_linear_reference,
)
from kvplane.quantization.int4_rtn import quantize_awq_rtn, quantize_gptq_rtn

GROUP_SIZES = [32, 64, 128, -1]
#: Nibble i holds the value i: 0x76543210.
WORD_0_TO_7 = sum(i << (4 * i) for i in range(8))


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


def _weight(
    generator: torch.Generator, output_size: int = 48, input_size: int = 256
) -> torch.Tensor:
    weight = torch.randn(output_size, input_size, generator=generator) * 0.05
    weight[0, :32] = torch.rand(32, generator=generator) * 0.1  # a group of non-negative values
    weight[1, :] = 0.0  # an all-zero row: empty ranges
    return weight


def _act_order_g_idx(input_size: int, group_size: int, generator: torch.Generator) -> torch.Tensor:
    """An act-order map: rows visited in a random order, groups of consecutive visits."""
    order = torch.randperm(input_size, generator=generator)
    g_idx = torch.empty(input_size, dtype=torch.int32)
    g_idx[order] = (torch.arange(input_size) // group_size).to(torch.int32)
    return g_idx


# -- packing and pinned bit order --------------------------------------------------------


@pytest.mark.parametrize("order", [GPTQ_NIBBLE_ORDER, AWQ_NIBBLE_ORDER], ids=["gptq", "awq"])
@pytest.mark.parametrize("dim", [0, 1])
def test_pack_unpack_round_trip(
    order: tuple[int, ...], dim: int, generator: torch.Generator
) -> None:
    values = torch.randint(0, 16, (16, 24), generator=generator, dtype=torch.int32)
    packed = pack_int4(values, dim=dim, order=order)
    assert packed.dtype == torch.int32
    assert packed.shape == ((2, 24) if dim == 0 else (16, 3))
    assert torch.equal(unpack_int4(packed, dim=dim, order=order), values)


def test_pack_puts_value_i_of_eight_at_bits_4i() -> None:
    values = torch.arange(8, dtype=torch.int32)[None, :]  # [1, 8]
    assert pack_int4(values, dim=1).item() == WORD_0_TO_7
    # AWQ: nibble i holds column (0, 2, 4, 6, 1, 3, 5, 7)[i], so column j's value j lands
    # in nibble (0, 4, 1, 5, 2, 6, 3, 7)[j].
    assert pack_int4(values, dim=1, order=AWQ_NIBBLE_ORDER).item() == 0x75316420
    # Nibble 7 set means a negative int32: the value 15 must survive the sign bit.
    top = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 15]], dtype=torch.int32)
    packed = pack_int4(top, dim=1)
    assert packed.item() == -(2**28) and torch.equal(unpack_int4(packed, dim=1), top)


def test_gptq_bit_order_of_a_hand_built_layer() -> None:
    # K = N = 8. Every qweight word 0x76543210 gives input row k the value k (packed along
    # the input dim); the qzeros word 0x76543210 gives output column n the stored zero n
    # (packed along the output dim). Scale 1, v1 offset: W[n, k] = k - (n + 1).
    qweight = torch.full((1, 8), WORD_0_TO_7, dtype=torch.int32)
    qzeros = torch.full((1, 1), WORD_0_TO_7, dtype=torch.int32)
    scales = torch.ones(1, 8, dtype=torch.float16)
    weight = dequantize_gptq(
        qweight, qzeros, scales, torch.zeros(8, dtype=torch.int32), zeros_offset=1
    )
    k, n = torch.arange(8)[None, :], torch.arange(8)[:, None]
    assert torch.equal(weight, (k - n - 1).float())


def test_awq_bit_order_of_a_hand_built_layer() -> None:
    # K = 2, N = 8, zeros 0, scale 2. Row 0's word 0x76543210 holds value i in nibble i, which
    # is column AWQ_NIBBLE_ORDER[i]; row 1's word 0x75316420 is what packing column j = j
    # gives. A plain (GPTQ-order) reading of either word would give other columns.
    qweight = torch.tensor([[WORD_0_TO_7], [0x75316420]], dtype=torch.int32)
    qzeros = torch.zeros(1, 1, dtype=torch.int32)
    scales = torch.full((1, 8), 2.0, dtype=torch.float16)
    weight = dequantize_awq(qweight, qzeros, scales, group_size=-1)  # [8, 2]
    assert weight[:, 0].tolist() == [2.0 * v for v in (0, 4, 1, 5, 2, 6, 3, 7)]
    assert weight[:, 1].tolist() == [2.0 * j for j in range(8)]
    # Zeros are interleaved the same way: a zero word 0x75316420 gives column j zero j.
    zeros = torch.tensor([[0x75316420]], dtype=torch.int32)
    shifted = dequantize_awq(qweight, zeros, scales, group_size=-1)
    assert torch.equal(shifted[:, 1], torch.zeros(8))


# -- round-to-nearest round trips --------------------------------------------------------


def _assert_on_grid_within_half_step(
    weight: torch.Tensor,  # [N, K]
    dequantized: torch.Tensor,  # [N, K]
    scales: torch.Tensor,  # [G, N]
    zeros: torch.Tensor,  # [G, N], true zero points
    g_idx: torch.Tensor,  # [K]
) -> None:
    step = scales.float()[g_idx.long()].t()  # [N, K]
    zero = zeros[g_idx.long()].t().float()  # [N, K]
    assert bool((step > 0).all())
    error = (dequantized - weight).abs()
    worst = (error / step).max().item()
    assert worst <= 0.5 + 1e-5, f"an element is {worst:.6f} steps from its original"
    q = dequantized / step + zero  # exact: small integers times a float16 scale
    assert torch.equal(q, q.round()), "dequantized values must lie on the (q - z) * s grid"
    assert bool(((q >= 0) & (q <= 15)).all())


@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("zeros_offset", [1, 0], ids=["v1", "v2"])
def test_gptq_rtn_round_trip(
    group_size: int, sym: bool, zeros_offset: int, generator: torch.Generator
) -> None:
    weight = _weight(generator)
    tensors = quantize_gptq_rtn(weight, group_size, sym, zeros_offset=zeros_offset)
    num_groups = 1 if group_size == -1 else 256 // group_size
    assert tensors["qweight"].shape == (32, 48) and tensors["qweight"].dtype == torch.int32
    assert tensors["qzeros"].shape == (num_groups, 6) and tensors["qzeros"].dtype == torch.int32
    assert tensors["scales"].shape == (num_groups, 48) and tensors["scales"].dtype == torch.float16
    assert torch.equal(tensors["g_idx"], sequential_g_idx(256, group_size))
    dequantized = dequantize_gptq(
        tensors["qweight"],
        tensors["qzeros"],
        tensors["scales"],
        tensors["g_idx"],
        zeros_offset=zeros_offset,
    )
    zeros = unpack_int4(tensors["qzeros"], dim=1) + zeros_offset
    if sym:
        assert bool((zeros == 8).all())
    _assert_on_grid_within_half_step(
        weight, dequantized, tensors["scales"], zeros, tensors["g_idx"]
    )


@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_awq_rtn_round_trip(group_size: int, generator: torch.Generator) -> None:
    weight = _weight(generator)
    tensors = quantize_awq_rtn(weight, group_size)
    num_groups = 1 if group_size == -1 else 256 // group_size
    assert tensors["qweight"].shape == (256, 6)
    assert tensors["qzeros"].shape == (num_groups, 6)
    assert tensors["scales"].shape == (num_groups, 48)
    dequantized = dequantize_awq(
        tensors["qweight"], tensors["qzeros"], tensors["scales"], group_size
    )
    zeros = unpack_int4(tensors["qzeros"], dim=1, order=AWQ_NIBBLE_ORDER)
    g_idx = sequential_g_idx(256, group_size)
    _assert_on_grid_within_half_step(weight, dequantized, tensors["scales"], zeros, g_idx)


def test_gptq_v1_never_stores_a_negative_zero(generator: torch.Generator) -> None:
    # All-positive groups want z = 0, which v1 (stored z - 1) cannot hold.
    weight = torch.rand(16, 64, generator=generator) + 0.5
    tensors = quantize_gptq_rtn(weight, 32, sym=False, zeros_offset=1)
    assert int(unpack_int4(tensors["qzeros"], dim=1).min()) >= 0
    dequantized = dequantize_gptq(
        tensors["qweight"], tensors["qzeros"], tensors["scales"], tensors["g_idx"], zeros_offset=1
    )
    zeros = unpack_int4(tensors["qzeros"], dim=1) + 1
    _assert_on_grid_within_half_step(
        weight, dequantized, tensors["scales"], zeros, tensors["g_idx"]
    )


# -- act-order and the zero offset -------------------------------------------------------


def test_act_order_dequantizes_like_a_per_row_loop(generator: torch.Generator) -> None:
    weight = _weight(generator, 16, 128)
    g_idx = _act_order_g_idx(128, 32, generator)
    tensors = quantize_gptq_rtn(weight, 32, g_idx=g_idx)
    qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
    dequantized = dequantize_gptq(qweight, qzeros, scales, g_idx, zeros_offset=1)

    expected = torch.empty(16, 128)
    for k in range(128):
        group = int(g_idx[k])
        for n in range(16):
            q = (int(qweight[k // 8, n]) >> (4 * (k % 8))) & 0xF
            z = ((int(qzeros[group, n // 8]) >> (4 * (n % 8))) & 0xF) + 1
            expected[n, k] = (q - z) * float(scales[group, n])
    assert torch.equal(dequantized, expected)
    _assert_on_grid_within_half_step(
        weight, dequantized, scales, unpack_int4(qzeros, dim=1) + 1, g_idx
    )
    assert not is_sequential_g_idx(g_idx, 32)
    assert is_sequential_g_idx(sequential_g_idx(128, 32), 32)
    sequential = dequantize_gptq(qweight, qzeros, scales, sequential_g_idx(128, 32), zeros_offset=1)
    assert not torch.equal(sequential, dequantized), "g_idx must decide each row's group"


def test_zeros_offset_shifts_by_one_step(generator: torch.Generator) -> None:
    weight = _weight(generator, 16, 128)
    v1 = quantize_gptq_rtn(weight, 64, sym=True, zeros_offset=1)
    v2 = quantize_gptq_rtn(weight, 64, sym=True, zeros_offset=0)
    assert torch.equal(v1["qweight"], v2["qweight"]) and torch.equal(v1["scales"], v2["scales"])
    assert torch.equal(unpack_int4(v1["qzeros"], dim=1) + 1, unpack_int4(v2["qzeros"], dim=1))
    args = (v1["qweight"], v1["qzeros"], v1["scales"], v1["g_idx"])
    as_v1 = dequantize_gptq(*args, zeros_offset=1)
    as_v2 = dequantize_gptq(*args, zeros_offset=0)
    step = v1["scales"].float()[v1["g_idx"].long()].t()  # [N, K]
    assert torch.equal(as_v2 - as_v1, step)
    assert torch.equal(
        as_v1,
        dequantize_gptq(v2["qweight"], v2["qzeros"], v2["scales"], v2["g_idx"], zeros_offset=0),
    )


# -- the torch reference linear ----------------------------------------------------------


@pytest.mark.parametrize("layout", ["gptq", "awq"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_linear_is_x_times_dequantized_weight(
    layout: str, dtype: torch.dtype, generator: torch.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(int4_packing, "_CHUNK_ELEMENTS", 8 * 256)  # several column chunks
    weight = _weight(generator, 40, 256)
    x = torch.randn(2, 3, 256, generator=generator).to(dtype)
    bias = torch.randn(40, generator=generator)
    if layout == "gptq":
        g_idx = _act_order_g_idx(256, 64, generator)
        t = quantize_gptq_rtn(weight, 64, g_idx=g_idx)
        qweight, qzeros, scales = t["qweight"], t["qzeros"], t["scales"]
        dequantized = dequantize_gptq(qweight, qzeros, scales, g_idx, zeros_offset=1)
        out = w4a16_linear_reference(
            x, qweight, qzeros, scales, g_idx, bias, layout="gptq", group_size=64, zeros_offset=1
        )
    else:
        t = quantize_awq_rtn(weight, 64)
        qweight, qzeros, scales = t["qweight"], t["qzeros"], t["scales"]
        dequantized = dequantize_awq(qweight, qzeros, scales, 64)
        out = w4a16_linear_reference(
            x, qweight, qzeros, scales, None, bias, layout="awq", group_size=64, zeros_offset=0
        )
    expected = (x.float() @ dequantized.t() + bias).to(dtype)
    assert out.shape == (2, 3, 40) and out.dtype == dtype
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


# -- errors ------------------------------------------------------------------------------


def test_inconsistent_tensors_raise_naming_the_tensor(generator: torch.Generator) -> None:
    t = quantize_gptq_rtn(_weight(generator, 16, 128), 32)
    qweight, qzeros, scales, g_idx = t["qweight"], t["qzeros"], t["scales"], t["g_idx"]
    with pytest.raises(
        ValueError, match=r"scales must have shape \[num_groups, output_size\] = \[4, 16\]"
    ):
        check_w4a16_shapes("gptq", qweight, qzeros, scales[:3], g_idx, 32)
    with pytest.raises(ValueError, match=r"qzeros must have shape .* = \[4, 2\]"):
        check_w4a16_shapes("gptq", qweight, qzeros[:, :1], scales, g_idx, 32)
    with pytest.raises(ValueError, match=r"g_idx must have shape \[input_size\] = \[128\]"):
        dequantize_gptq(qweight, qzeros, scales, g_idx[:64], zeros_offset=1)
    with pytest.raises(ValueError, match="qweight must be a 2-D int32"):
        check_w4a16_shapes("gptq", qweight.long(), qzeros, scales, g_idx, 32)
    with pytest.raises(ValueError, match="g_idx values must lie in"):
        dequantize_gptq(qweight, qzeros, scales, g_idx + 4, zeros_offset=1)
    with pytest.raises(ValueError, match="layout must be one of"):
        check_w4a16_shapes("exl2", qweight, qzeros, scales, g_idx, 32)
    with pytest.raises(ValueError, match="group_size must be positive or -1"):
        check_w4a16_shapes("gptq", qweight, qzeros, scales, g_idx, 0)
    with pytest.raises(ValueError, match="zeros_offset must be 0 or 1"):
        dequantize_gptq(qweight, qzeros, scales, g_idx, zeros_offset=2)
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., 128\]"):
        w4a16_linear_reference(
            torch.zeros(2, 64),
            qweight,
            qzeros,
            scales,
            layout="gptq",
            group_size=32,
            zeros_offset=1,
        )
    awq = quantize_awq_rtn(_weight(generator, 16, 128), 32)
    awq_packed = (awq["qweight"], awq["qzeros"], awq["scales"])
    with pytest.raises(ValueError, match="AWQ layers have no g_idx"):
        check_w4a16_shapes("awq", *awq_packed, g_idx, 32)
    with pytest.raises(ValueError, match="zeros_offset must be 0"):
        w4a16_linear_reference(
            torch.zeros(1, 128), *awq_packed, layout="awq", group_size=32, zeros_offset=1
        )


def test_quantizer_and_packer_input_errors(generator: torch.Generator) -> None:
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_int4(torch.zeros(1, 12, dtype=torch.int32), dim=1)
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_int4(torch.full((1, 8), 16, dtype=torch.int32), dim=1)
    with pytest.raises(ValueError, match="integer tensor"):
        pack_int4(torch.zeros(1, 8), dim=1)
    with pytest.raises(ValueError, match="weight sizes must be multiples of 8"):
        quantize_gptq_rtn(torch.zeros(12, 64), 32)
    with pytest.raises(ValueError, match="2-D float tensor"):
        quantize_awq_rtn(torch.zeros(8, 64, dtype=torch.int32), 32)
    with pytest.raises(ValueError, match="divisible by group_size"):
        quantize_awq_rtn(torch.zeros(8, 96), 64)
    with pytest.raises(ValueError, match="non-finite"):
        quantize_gptq_rtn(torch.full((8, 64), float("nan")), 32)
    with pytest.raises(
        ValueError, match=r"g_idx must be an integer tensor of shape \[input_size\]"
    ):
        quantize_gptq_rtn(torch.zeros(8, 64), 32, g_idx=torch.zeros(32, dtype=torch.int32))
