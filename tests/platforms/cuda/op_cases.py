"""Shared cases of the CUDA platform's op tests (not collected itself): devices and dtypes,
the platform's op table, random inputs."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kvplane_cuda import ops
from tests.platforms.cuda.devices import DEVICES, HAS_GPU

# bfloat16 only compiled: the interpreter truncates float32 -> bfloat16 instead of rounding.
CASES = [
    (device, dtype)
    for device in DEVICES
    for dtype in (torch.float32, torch.float16, torch.bfloat16)
    if device == "cuda" or dtype != torch.bfloat16
]
CASE_IDS = [f"{device}-{str(dtype).removeprefix('torch.')}" for device, dtype in CASES]
realistic = pytest.mark.skipif(not HAS_GPU, reason="model-sized shapes need a GPU")

OPS: dict[str, Any] = ops.cuda_ops()


def randn(
    shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator, scale: float = 1.0
) -> torch.Tensor:
    return (torch.randn(shape, generator=gen) * scale).to(dtype)
