"""Acme's ops: start with one, add the rest as kernels arrive.

Each op must have the signature and semantics of its namesake in
``kvplane.ops.reference``; the conformance kit compares them on random inputs. Names not
returned here use the reference.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:  # [num_tokens, 2 * I] -> [num_tokens, I]
    """``silu(x[..., :I]) * x[..., I:]`` computed in float32, returned in ``x.dtype``.

    A real vendor calls its fused kernel here.
    """
    gate, up = x.chunk(2, dim=-1)
    return (F.silu(gate.float()) * up.float()).to(x.dtype)


def acme_ops() -> dict[str, Callable[..., Any]]:
    """The ops Acme implements, keyed by their stable names (``kvplane.ops.OP_NAMES``)."""
    return {"silu_and_mul": silu_and_mul}
