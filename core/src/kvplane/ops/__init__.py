"""Ops by stable name: the table the model layers call, resolved once at start-up.

:mod:`kvplane.ops.reference` defines every op in plain torch; it is built from the public
steps of :mod:`kvplane.ops.steps`, which platform implementations reuse rather than copy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvplane.ops import reference

#: Every op name a platform may implement through ``kvplane_ops``.
OP_NAMES: tuple[str, ...] = (
    "rms_norm",
    "fused_add_rms_norm",
    "rotary_embedding",
    "silu_and_mul",
    "gelu_and_mul",
    "reshape_and_cache",
    "top_k_top_p_sample",
    "fused_moe",
)


@dataclass(frozen=True, slots=True)
class Ops:
    """The resolved op table: one callable per name in :data:`OP_NAMES`.

    Built once by :class:`kvplane.plugins.platform.Platform`; layers keep a reference to
    the callables they use so the per-step path does no lookups.
    """

    rms_norm: Callable[..., Any]
    fused_add_rms_norm: Callable[..., Any]
    rotary_embedding: Callable[..., Any]
    silu_and_mul: Callable[..., Any]
    gelu_and_mul: Callable[..., Any]
    reshape_and_cache: Callable[..., Any]
    top_k_top_p_sample: Callable[..., Any]
    fused_moe: Callable[..., Any]


def reference_ops() -> dict[str, Callable[..., Any]]:
    """The reference implementation of every op, keyed by name."""
    return {name: getattr(reference, name) for name in OP_NAMES}


__all__ = ["OP_NAMES", "Ops", "reference_ops"]
