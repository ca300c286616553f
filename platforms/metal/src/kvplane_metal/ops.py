"""Metal's op table: the core's torch ops, but for the differences below.

On MPS most ops are best left as the few large torch calls the reference already makes
(:mod:`kvplane.ops.reference`): each becomes one or two MPS kernels, and a hand-written
Metal kernel per op would not pay for its upkeep. They are offered here as Metal's own,
so the start-up log does not report them as fallbacks. Metal keeps only its differences:

- ``rms_norm`` and ``fused_add_rms_norm`` through ``torch.nn.functional.rms_norm``
  (one fused MPS kernel instead of five element-wise passes), still in float32.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from kvplane.ops import reference_ops, steps


def rms_norm(
    x: torch.Tensor,  # [..., hidden_size], any strides
    weight: torch.Tensor,  # [hidden_size]
    eps: float,
) -> torch.Tensor:  # x's shape
    """The reference's ``x / sqrt(mean(x**2) + eps) * weight`` in float32, fused."""
    normed = F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps)
    return normed.to(x.dtype)


def fused_add_rms_norm(
    x: torch.Tensor,  # [num_tokens, hidden_size]
    residual: torch.Tensor,  # [num_tokens, hidden_size]
    weight: torch.Tensor,  # [hidden_size]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(x + residual), x + residual)``, the sum rounded as the reference's."""
    summed = steps.residual_sum(x, residual)
    return rms_norm(summed, weight, eps), summed


#: Metal's own versions; every other op is the reference's.
METAL_OPS: dict[str, Callable[..., Any]] = {
    "rms_norm": rms_norm,
    "fused_add_rms_norm": fused_add_rms_norm,
}


def metal_ops() -> dict[str, Callable[..., Any]]:
    """Every op by stable name: :data:`METAL_OPS` over the reference's."""
    return {**reference_ops(), **METAL_OPS}
