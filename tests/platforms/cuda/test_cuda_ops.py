"""The CUDA platform's sync-free ops against the reference (on the CPU, and on a GPU
when there is one)."""

from __future__ import annotations

import pytest
import torch

from kvplane.ops import OP_NAMES
from kvplane.ops import reference as ref
from kvplane_cuda import ops

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOLERANCES = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    tolerance = TOLERANCES[expected.dtype]
    torch.testing.assert_close(actual.cpu(), expected, atol=tolerance, rtol=tolerance)


def test_offers_only_known_ops() -> None:
    assert set(ops.cuda_ops()) <= set(OP_NAMES)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_norms_and_activations(device: str, dtype: torch.dtype, generator: torch.Generator) -> None:
    x = torch.randn(7, 128, generator=generator).to(dtype)
    residual = torch.randn(7, 128, generator=generator).to(dtype)
    weight = torch.randn(128, generator=generator).to(dtype)
    assert_close(ops.rms_norm(x.to(device), weight.to(device), 1e-6), ref.rms_norm(x, weight, 1e-6))
    expected = ref.fused_add_rms_norm(x, residual, weight, 1e-6)
    on_device = residual.to(device, copy=True)
    actual = ops.fused_add_rms_norm(x.to(device), on_device, weight.to(device), 1e-6)
    assert_close(actual[0], expected[0])
    torch.testing.assert_close(actual[1].cpu(), expected[1], atol=0, rtol=0)
    assert actual[1].data_ptr() == on_device.data_ptr()
    assert_close(ops.silu_and_mul(x.to(device)), ref.silu_and_mul(x))
    assert_close(ops.gelu_and_mul(x.to(device), "tanh"), ref.gelu_and_mul(x, "tanh"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "skipped",
    [[], [0], [2, 5], [0, 1, 2, 3, 4, 5, 6]],
    ids=["none", "first", "some", "all"],
)
def test_reshape_and_cache_skips_negative_slots(
    device: str, skipped: list[int], generator: torch.Generator
) -> None:
    key = torch.randn(7, 2, 8, generator=generator)
    value = torch.randn(7, 2, 8, generator=generator)
    slot_mapping = torch.randperm(24, generator=generator)[:7]
    slot_mapping[skipped] = -1
    cache = torch.randn(2, 6, 4, 2, 8, generator=generator).to(torch.bfloat16)
    expected = cache.clone()
    ref.reshape_and_cache(key, value, expected, slot_mapping)
    on_device = cache.to(device, copy=True)
    ops.reshape_and_cache(key.to(device), value.to(device), on_device, slot_mapping.to(device))
    assert torch.equal(on_device.cpu(), expected)
