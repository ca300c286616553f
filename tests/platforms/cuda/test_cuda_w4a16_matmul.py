"""The CUDA platform's W4A16 (int4 GPTQ/AWQ) Triton matmul against the torch reference.

Packed layers come from the core's round-to-nearest quantizers; the reference is
:func:`kvplane.quantization.int4_packing.w4a16_linear_reference` on the CPU copies. On the
CPU the kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``) on small shapes, in
float32 and float16. bfloat16 runs only compiled, on a GPU, as in the other CUDA kernel
tests: Triton 3.6's interpreter keeps bfloat16 as raw ``uint16`` bits, so its ``tl.dot``
multiplies bit patterns and int-to-bfloat16 casts are wrong (triton-lang/triton#11584,
"the interpreter doesn't support bf16"). On a GPU every case also runs in bfloat16, and
the ``realistic`` tests add model-sized shapes. Tolerances are
:data:`kvplane.testing.helpers.MATMUL_TOLERANCES` (float32 allows TF32).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kvplane.quantization.int4_packing import w4a16_linear_reference
from kvplane.quantization.int4_rtn import quantize_awq_rtn, quantize_gptq_rtn
from kvplane.testing.helpers import MATMUL_TOLERANCES, assert_close, randn
from kvplane_cuda.kernels.w4a16_matmul import DECODE_MAX_TOKENS, w4a16_matmul
from tests.platforms.cuda.devices import DEVICES
from tests.platforms.cuda.op_cases import CASE_IDS, CASES, realistic

# (layout, act-order): AWQ has no act-order.
FORMATS = [("gptq", False), ("gptq", True), ("awq", False)]
FORMAT_IDS = ["gptq", "gptq-act", "awq"]
GROUP_SIZES = [32, 64, 128, -1]
# (num_tokens, output_size, input_size): decode (split-K) with 1 and 7 tokens, prefill 40.
SHAPES = [(1, 64, 256), (7, 96, 128), (40, 96, 256), (40, 64, 128)]
#: (qweight, qzeros, scales)
Packed = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _packed_layer(
    layout: str,
    act_order: bool,
    output_size: int,
    input_size: int,
    group_size: int,
    generator: torch.Generator,
) -> tuple[Packed, torch.Tensor | None, int]:
    """``((qweight, qzeros, scales), g_idx or None, zeros_offset)`` of a random layer."""
    weight = randn((output_size, input_size), torch.float32, generator, scale=0.05)
    if layout == "awq":
        t = quantize_awq_rtn(weight, group_size)
        return (t["qweight"], t["qzeros"], t["scales"]), None, 0
    g_idx = None
    if act_order:
        size = input_size if group_size == -1 else group_size
        order = torch.randperm(input_size, generator=generator)
        g_idx = torch.empty(input_size, dtype=torch.int32)
        g_idx[order] = (torch.arange(input_size) // size).to(torch.int32)
    t = quantize_gptq_rtn(weight, group_size, sym=not act_order, g_idx=g_idx)
    return (t["qweight"], t["qzeros"], t["scales"]), g_idx, 1


def _check(
    device: str,
    x: torch.Tensor,
    packed: Packed,
    g_idx: torch.Tensor | None,
    layout: str,
    group_size: int,
    zeros_offset: int,
) -> None:
    kwargs: dict[str, Any] = {
        "layout": layout,
        "group_size": group_size,
        "zeros_offset": zeros_offset,
    }
    qweight, qzeros, scales = packed
    expected = w4a16_linear_reference(x, qweight, qzeros, scales, g_idx, **kwargs)
    out = w4a16_matmul(
        x.to(device, copy=True),
        qweight.to(device),
        qzeros.to(device),
        scales.to(device),
        None if g_idx is None else g_idx.to(device),
        **kwargs,
    )
    assert out.dtype == x.dtype and out.shape == expected.shape
    assert_close(out, expected, MATMUL_TOLERANCES)


@pytest.mark.parametrize(("device", "dtype"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize(("layout", "act_order"), FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize(("num_tokens", "output_size", "input_size"), SHAPES)
def test_w4a16_matmul_matches_reference(
    device: str,
    dtype: torch.dtype,
    layout: str,
    act_order: bool,
    group_size: int,
    num_tokens: int,
    output_size: int,
    input_size: int,
    generator: torch.Generator,
) -> None:
    packed, g_idx, offset = _packed_layer(
        layout, act_order, output_size, input_size, group_size, generator
    )
    x = randn((num_tokens, input_size), dtype, generator)
    _check(device, x, packed, g_idx, layout, group_size, offset)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("layout", "act_order"), FORMATS, ids=FORMAT_IDS)
def test_strided_and_batched_inputs(
    device: str, layout: str, act_order: bool, generator: torch.Generator
) -> None:
    packed, g_idx, offset = _packed_layer(layout, act_order, 64, 128, 64, generator)
    wide = randn((5, 200), torch.float32, generator)
    _check(device, wide[:, 40:168], packed, g_idx, layout, 64, offset)  # row stride 200
    batched = randn((2, 9, 128), torch.float32, generator)  # [batch, tokens, K]
    _check(device, batched, packed, g_idx, layout, 64, offset)


@pytest.mark.parametrize("device", DEVICES)
def test_gptq_v2_zero_offset_and_ragged_k(device: str, generator: torch.Generator) -> None:
    # K = 200 is no multiple of the K tile: the last tile's words and rows are masked.
    weight = randn((64, 200), torch.float32, generator, scale=0.05)
    t = quantize_gptq_rtn(weight, 40, sym=False, zeros_offset=0)
    packed = (t["qweight"], t["qzeros"], t["scales"])
    for num_tokens in (3, DECODE_MAX_TOKENS + 1):
        x = randn((num_tokens, 200), torch.float32, generator)
        _check(device, x, packed, None, "gptq", 40, 0)
        _check(device, x, packed, t["g_idx"], "gptq", 40, 0)


@pytest.mark.parametrize("device", DEVICES)
def test_no_tokens_and_user_errors(device: str, generator: torch.Generator) -> None:
    (qweight, qzeros, scales), _, _ = _packed_layer("awq", False, 64, 128, 32, generator)
    packed = (qweight.to(device), qzeros.to(device), scales.to(device))
    kwargs: dict[str, Any] = {"layout": "awq", "group_size": 32, "zeros_offset": 0}
    empty = w4a16_matmul(torch.empty(0, 128, device=device), *packed, **kwargs)
    assert empty.shape == (0, 64)
    x = torch.zeros(2, 128, device=device)
    with pytest.raises(ValueError, match="layout must be"):
        w4a16_matmul(x, *packed, layout="marlin", group_size=32, zeros_offset=0)
    with pytest.raises(ValueError, match="zeros_offset"):
        w4a16_matmul(x, *packed, layout="awq", group_size=32, zeros_offset=1)
    with pytest.raises(ValueError, match="x must be float16, bfloat16 or float32"):
        w4a16_matmul(x.to(torch.float64), *packed, **kwargs)
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., 128\]"):
        w4a16_matmul(x[:, :64], *packed, **kwargs)
    with pytest.raises(ValueError, match="scales must have shape"):
        w4a16_matmul(x, packed[0], packed[1], packed[2][:2], **kwargs)


# -- model-sized shapes, GPU only ---------------------------------------------------------


@realistic
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("layout", "act_order"), FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("num_tokens", [1, 16, 17, 300])
def test_model_sized_shapes(
    dtype: torch.dtype, layout: str, act_order: bool, num_tokens: int, generator: torch.Generator
) -> None:
    packed, g_idx, offset = _packed_layer(layout, act_order, 11008, 4096, 128, generator)
    x = randn((num_tokens, 4096), dtype, generator)
    _check("cuda", x, packed, g_idx, layout, 128, offset)
