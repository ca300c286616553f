"""The attention layer: asks the platform for a backend once, then calls its impl."""

from __future__ import annotations

import math

import torch

from kvplane.attention.metadata import AttentionMetadata
from kvplane.models.layers.context import BuildContext
from kvplane.plugins.types import AttentionSpec


class Attention(torch.nn.Module):
    """Paged attention over this layer's KV cache.

    ``kv_cache`` is bound by the model runner after the cache is allocated
    (``[2, num_blocks, block_size, num_kv_heads, head_size]``); until then the layer
    cannot run. A quantized cache (``ctx.kv_cache_dtype`` float8_e4m3fn) holds keys and
    values divided by this layer's scales: 1.0 unless the checkpoint sets them
    (:meth:`set_kv_scale`, called while the weights load).
    """

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_size: int,
        scale: float,
        ctx: BuildContext,
        sliding_window: int | None = None,
        logit_softcap: float | None = None,
    ) -> None:
        super().__init__()
        self.spec = AttentionSpec(
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_size=head_size,
            dtype=ctx.dtype,
            block_size=ctx.block_size,
            scale=scale,
            sliding_window=sliding_window,
            logit_softcap=logit_softcap,
            kv_cache_dtype=ctx.kv_cache_dtype,
        )
        backend = ctx.platform.attention_backend(self.spec)
        self.backend_name = backend.name
        self.supports_graph_capture = backend.supports_graph_capture
        self.impl = backend.make_impl(self.spec)
        self.kv_cache: torch.Tensor | None = None
        #: Which of "k" and "v" got their scale from the checkpoint (for the load log).
        self.checkpoint_kv_scales: set[str] = set()

    def set_kv_scale(self, which: str, scale: float) -> None:
        """Use ``scale`` for this layer's keys (``which="k"``) or values (``"v"``) in a
        quantized cache. Called while the weights load, before the first forward (a
        captured graph keeps the scale it was captured with); a float cache ignores it.

        Raises ``ValueError`` for a scale that is not a positive finite number.
        """
        if which not in ("k", "v"):
            raise ValueError(f"which must be 'k' or 'v', got {which!r}")
        if not (math.isfinite(scale) and scale > 0.0):
            raise ValueError(f"{which}_scale must be a positive finite number, got {scale}")
        setattr(self.impl, f"{which}_scale", float(scale))
        self.checkpoint_kv_scales.add(which)

    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_size]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
        metadata: AttentionMetadata,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_size]
        if self.kv_cache is None:
            raise RuntimeError("attention layer used before its KV cache was bound")
        return self.impl.forward(query, key, value, self.kv_cache, metadata)
