"""CUDA ops: the Triton kernels of :mod:`kvplane_cuda.kernels`, keyed by op name.

Importing this module needs torch only; :func:`cuda_ops` imports Triton and the kernels
when the plugin builds the op table, so discovery works on machines without either.
Each op has the signature and semantics of its namesake in :mod:`kvplane.ops.reference`,
with one documented difference: ``rotary_embedding`` rotates ``query`` and ``key`` in
place and returns them. ``fused_moe`` comes from the reference.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def cuda_ops() -> dict[str, Callable[..., Any]]:
    """The Triton ops keyed by stable name; the others fall back to the reference.

    Every op launches without a host sync, on grids that depend only on tensor shapes,
    so each is CUDA-graph capturable.
    """
    from kvplane_cuda.kernels import activation, cache, norm, rotary, sampling

    return {
        "rms_norm": norm.rms_norm,
        "fused_add_rms_norm": norm.fused_add_rms_norm,
        "rotary_embedding": rotary.rotary_embedding,
        "silu_and_mul": activation.silu_and_mul,
        "gelu_and_mul": activation.gelu_and_mul,
        "reshape_and_cache": cache.reshape_and_cache,
        "top_k_top_p_sample": sampling.top_k_top_p_sample,
    }
