"""The FP8 KV cache's quantization steps and the reference cache write into FP8."""

from __future__ import annotations

import pytest
import torch

from kvplane.ops import reference, steps

FP8 = torch.float8_e4m3fn


def test_quantize_saturates_instead_of_giving_nan() -> None:
    x = torch.tensor([1000.0, -1000.0, 448.0, -449.0, 1e30])
    assert steps.quantize_kv(x, 1.0, FP8).float().tolist() == [448.0, -448.0, 448.0, -448.0, 448.0]
    assert steps.quantize_kv(x, 4.0, FP8).float().tolist() == [256.0, -256.0, 112.0, -112.0, 448.0]


def test_quantize_divides_by_the_scale_and_rounds_to_nearest_even() -> None:
    # e4m3 steps: 1 between 8 and 16, 1/8 between 1 and 2, 2^-8 between 2^-5 and
    # 2^-4; ties go to the even code (8.5 -> 8, 9.5 -> 10, 1.0625 -> 1).
    x = torch.tensor([17.0, 19.0, 0.1, -2.125, -3e-4])
    codes = steps.quantize_kv(x, 2.0, FP8).float()
    assert codes.tolist() == [8.0, 10.0, 13 * 2**-8, -1.0, -0.0]
    assert str(codes[-1].item()) == "-0.0"  # a negative value that rounds to zero


def test_dequantize_multiplies_in_float32() -> None:
    stored = torch.tensor([448.0, -0.5, 0.015625]).to(FP8)
    out = steps.dequantize_kv(stored, 0.37)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([448.0, -0.5, 0.015625]) * 0.37)


def test_only_float8_caches_are_quantized() -> None:
    assert steps.is_quantized_kv_cache(FP8)
    for dtype in (None, torch.float32, torch.bfloat16, torch.float16, torch.float8_e5m2):
        assert not steps.is_quantized_kv_cache(dtype)


@pytest.mark.parametrize(("k_scale", "v_scale"), [(1.0, 1.0), (0.37, 1.7)])
def test_reference_write_into_fp8(k_scale: float, v_scale: float) -> None:
    generator = torch.Generator().manual_seed(0)
    key = torch.randn(9, 2, 8, generator=generator) * 50
    value = torch.randn(9, 2, 8, generator=generator)
    kv_cache = torch.randn(2, 4, 4, 2, 8, generator=generator).to(FP8)
    slot_mapping = torch.tensor([3, -1, 0, 15, 7, -1, 8, 2, 11])
    written = kv_cache.clone()
    reference.reshape_and_cache(key, value, written, slot_mapping, k_scale, v_scale)
    expected = kv_cache.view(torch.uint8).clone().view(2, -1, 2, 8)
    valid = slot_mapping >= 0
    for index, (x, scale) in enumerate(((key, k_scale), (value, v_scale))):
        codes = (x[valid] / scale).clamp(-448, 448).to(FP8)
        expected[index, slot_mapping[valid]] = codes.view(torch.uint8)
    assert torch.equal(written.view(torch.uint8).view(2, -1, 2, 8), expected)


def test_a_float_cache_ignores_the_scales() -> None:
    generator = torch.Generator().manual_seed(1)
    key, value = torch.randn(2, 3, 1, 4, generator=generator)
    slot_mapping = torch.tensor([5, -1, 1])
    plain, scaled = torch.zeros(2, 2, 4, 1, 4), torch.zeros(2, 2, 4, 1, 4)
    reference.reshape_and_cache(key, value, plain, slot_mapping)
    reference.reshape_and_cache(key, value, scaled, slot_mapping, 0.5, 3.0)
    assert torch.equal(plain, scaled)


def test_byte_view_only_reinterprets_float8() -> None:
    fp8 = torch.zeros(3, dtype=FP8)
    assert steps.byte_view(fp8).dtype == torch.uint8
    assert steps.byte_view(fp8).data_ptr() == fp8.data_ptr()
    for dtype in (torch.float32, torch.bfloat16, torch.int8):
        tensor = torch.zeros(3, dtype=dtype)
        assert steps.byte_view(tensor) is tensor
