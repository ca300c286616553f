"""The GGUF matmul kernel against :func:`gguf_linear_reference`, every format and dtype.

On the CPU the kernel runs in Triton's interpreter on small shapes. Triton 3.6's
interpreter multiplies bfloat16 ``tl.dot`` operands as their raw uint16 bits, so the
bfloat16 cases widen them to float32 first (exact; see :func:`interpreter_bfloat16_dot`):
what is tested there is the kernel's decoding and tiling, with the interpreter's
truncating float32 -> bfloat16 casts. On a GPU every case runs compiled, and the
``realistic`` cases add model-sized shapes.

Tolerances, on ``|out - ref| <= atol + rtol * |ref|`` with ``atol = rtol * max|ref|``:
float32 ``1e-5`` (summation order only: the weights decode to the same float32);
float16 ``2e-3`` (one float16 rounding of the output in either order of summation);
bfloat16 ``2**-6`` (the interpreter truncates the weights and output to bfloat16 where
the reference rounds: up to one bfloat16 ulp, ``2**-7``, on each).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from kvplane.quantization.gguf_blocks import GGUF_BLOCK_FORMATS, gguf_linear_reference
from kvplane_cuda.kernels.gguf_matmul import gguf_matmul
from tests.core.quantization.gguf_cases import (
    FORMAT_NAMES,
    default_model_tensors,
    random_gguf_bytes,
)
from tests.platforms.cuda.devices import DEVICES, INTERPRET, needs_gpu

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2.0**-6}

# (num_tokens, num_rows N, blocks along K of a 32-weight format, of a 256-weight format)
SHAPES = [(1, 48, 4, 2), (5, 32, 3, 1), (33, 48, 2, 2)]


@pytest.fixture(autouse=True)
def interpreter_bfloat16_dot(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Under the interpreter, give ``tl.dot`` bfloat16 operands as float32 values.

    Triton 3.6's interpreter stores bfloat16 as uint16 and its ``create_dot`` calls
    ``np.matmul`` on those bits. Widening bfloat16 to float32 is exact (the bits shifted
    up by 16), so this changes no value the compiled kernel would see.
    """
    if INTERPRET:
        import triton.language as tl
        from triton.runtime import interpreter

        original = interpreter.InterpreterBuilder.create_dot

        def widen(handle: interpreter.TensorHandle) -> interpreter.TensorHandle:
            if handle.dtype.scalar != tl.bfloat16:
                return handle
            bits = handle.data.astype(np.uint32) << np.uint32(16)
            return interpreter.TensorHandle(bits.view(np.float32), tl.float32)

        def create_dot(self: object, a: object, b: object, *args: object) -> object:
            return original(self, widen(a), widen(b), *args)  # type: ignore[arg-type]

        monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)
    yield


def assert_matches(out: torch.Tensor, ref: torch.Tensor) -> None:
    rtol = RTOL[ref.dtype]
    atol = rtol * ref.float().abs().max().item()
    torch.testing.assert_close(out.float().cpu(), ref.float(), rtol=rtol, atol=atol)


def run_case(
    name: str,
    dtype: torch.dtype,
    num_tokens: int,
    num_rows: int,
    num_columns: int,
    device: str,
    generator: torch.Generator,
) -> None:
    fmt = GGUF_BLOCK_FORMATS[name]
    raw = random_gguf_bytes(fmt, num_rows, num_columns, generator, scale=0.05)
    x = torch.randn(num_tokens, num_columns, generator=generator).to(dtype)
    ref = gguf_linear_reference(x, raw, fmt, num_rows, num_columns)
    x_device, raw_device = x.to(device), raw.to(device)
    out = gguf_matmul(x_device, raw_device, fmt)
    assert out.dtype == dtype and out.shape == (num_tokens, num_rows)
    assert_matches(out, ref)
    assert torch.equal(x_device.cpu(), x) and torch.equal(raw_device.cpu(), raw)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("name", FORMAT_NAMES)
@pytest.mark.parametrize(("num_tokens", "num_rows", "blocks_32", "blocks_256"), SHAPES)
def test_matches_reference(
    device: str,
    dtype: torch.dtype,
    name: str,
    num_tokens: int,
    num_rows: int,
    blocks_32: int,
    blocks_256: int,
    generator: torch.Generator,
) -> None:
    weights_per_block = GGUF_BLOCK_FORMATS[name].weights_per_block
    num_blocks = blocks_32 if weights_per_block == 32 else blocks_256
    num_columns = num_blocks * weights_per_block
    run_case(name, dtype, num_tokens, num_rows, num_columns, device, generator)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_x_and_empty_inputs(device: str, generator: torch.Generator) -> None:
    fmt = GGUF_BLOCK_FORMATS["Q8_0"]
    raw = random_gguf_bytes(fmt, 40, 64, generator, scale=0.05)
    wide = torch.randn(3, 100, generator=generator)
    x = wide[:, 10:74]  # [3, 64], row stride 100
    ref = gguf_linear_reference(x, raw, fmt, 40, 64)
    assert_matches(gguf_matmul(x.to(device), raw.to(device), fmt, num_columns=64), ref)
    empty = gguf_matmul(torch.empty(0, 64, device=device), raw.to(device), fmt)
    assert empty.shape == (0, 40)


@pytest.mark.parametrize("device", DEVICES)
def test_tensors_of_the_default_model(device: str, generator: torch.Generator) -> None:
    # SmolLM2's Q4_1 projections and a slice of its Q8_0 embedding, as the file stores them.
    for _, fmt, num_columns, raw in default_model_tensors(max_rows=96, per_type=1):
        x = torch.randn(3, num_columns, generator=generator)
        ref = gguf_linear_reference(x, raw, fmt, raw.shape[0], num_columns)
        assert_matches(gguf_matmul(x.to(device), raw.to(device), fmt), ref)


def test_user_errors(generator: torch.Generator) -> None:
    fmt = GGUF_BLOCK_FORMATS["Q4_K"]
    raw = random_gguf_bytes(fmt, 4, 256, generator)  # [4, 144]
    x = torch.randn(2, 256)
    with pytest.raises(ValueError, match=r"float16/bfloat16/float32"):
        gguf_matmul(x.to(torch.float64), raw, fmt)
    with pytest.raises(ValueError, match=r"x has 256 columns but the weight has 512"):
        gguf_matmul(x, raw, fmt, num_columns=512)
    with pytest.raises(ValueError, match=r"not a multiple of 256"):
        gguf_matmul(torch.randn(2, 128), raw, fmt)
    with pytest.raises(ValueError, match=r"\(4, 144\) do not hold a \[4, 512\] weight"):
        gguf_matmul(torch.randn(2, 512), raw, fmt)
    with pytest.raises(ValueError, match=r"contiguous rows"):
        gguf_matmul(x, raw.T.contiguous().T, fmt)
    with pytest.raises(ValueError, match=r"unsupported GGUF block type"):
        gguf_matmul(x, raw, "Q2_K")


# -- model-sized shapes (GPU only) -----------------------------------------------------

# (num_tokens, N, K): decode and prefill of SmolLM2-135M and a Llama-8B-sized projection.
REALISTIC_SHAPES = [(1, 576, 1536), (7, 1536, 512), (300, 576, 1536), (16, 4096, 4096)]


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("name", FORMAT_NAMES)
@pytest.mark.parametrize(("num_tokens", "num_rows", "num_columns"), REALISTIC_SHAPES)
def test_realistic_shapes(
    dtype: torch.dtype,
    name: str,
    num_tokens: int,
    num_rows: int,
    num_columns: int,
    generator: torch.Generator,
) -> None:
    if num_columns % GGUF_BLOCK_FORMATS[name].weights_per_block:
        pytest.skip(f"{num_columns} columns are not whole {name} blocks")
    run_case(name, dtype, num_tokens, num_rows, num_columns, "cuda", generator)
