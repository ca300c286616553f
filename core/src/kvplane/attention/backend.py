"""The interface every attention backend implements, and what all of them share."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from kvplane.attention.metadata import AttentionMetadata
from kvplane.ops import steps
from kvplane.ops.reference import reshape_and_cache

if TYPE_CHECKING:
    # Annotation only: importing kvplane.plugins here would be circular, since the
    # plugin package imports this module.
    from kvplane.plugins.types import AttentionSpec

#: Writes new keys and values into a layer's cache at their slots, in place:
#: ``(key, value, kv_cache, slot_mapping) -> None`` with the shapes and semantics of
#: :func:`kvplane.ops.reference.reshape_and_cache` (slots < 0 are skipped). A quantized
#: (float8) cache's writer is called with two more arguments, ``k_scale`` and
#: ``v_scale`` (floats), and stores ``x / scale`` saturated; only backends that set
#: :attr:`AttentionBackend.supports_fp8_kv_cache` get such caches.
KVCacheWriter = Callable[..., None]


class AttentionBackend(ABC):
    """Attention over the paged KV cache for one layer shape.

    Platforms return candidates from :func:`kvplane_attention_backends`; the core keeps the
    highest-``priority`` one whose :meth:`cannot_serve` returns ``None`` and builds one
    :class:`AttentionImpl` per layer from it.
    """

    #: Short name shown in logs and in ``kvplane platforms``.
    name: str = "unnamed"
    #: Higher wins among the candidates that can serve a spec.
    priority: int = 0
    #: Whether a captured graph may replay this backend's forward: it reads only device
    #: tensors of the metadata (not the ``*_cpu`` copies), treats ``max_seq_len`` and
    #: ``max_query_len`` as upper bounds, and never syncs with the host. Decode graphs
    #: are captured only when every layer's backend says so.
    supports_graph_capture: bool = False
    #: Whether this backend reads a float8_e4m3fn KV cache (since plugin API 1.5): its
    #: writer stores ``x / scale`` saturated to +-448 and its attention reads
    #: ``stored * scale`` in float32, with the impl's :attr:`AttentionImpl.k_scale` and
    #: :attr:`AttentionImpl.v_scale`. Backends that do not say so are never given one.
    supports_fp8_kv_cache: bool = False

    def cannot_serve(self, spec: AttentionSpec) -> str | None:
        """Return why this backend cannot serve ``spec``, or ``None`` if it can.

        The base checks what every backend needs: the query heads split evenly over the
        KV heads (:attr:`AttentionImpl.group_size`), and a quantized ``kv_cache_dtype``
        only where :attr:`supports_fp8_kv_cache` is set. A backend with limits of its own
        overrides this and returns ``super().cannot_serve(spec)`` where its checks allow.
        """
        if spec.num_heads % spec.num_kv_heads != 0:
            return f"num_heads {spec.num_heads} not a multiple of {spec.num_kv_heads}"
        return fp8_kv_cache_refusal(self, spec)

    @abstractmethod
    def make_impl(self, spec: AttentionSpec) -> AttentionImpl:
        """Build the per-layer implementation for ``spec`` (called once per layer)."""


def fp8_kv_cache_refusal(backend: AttentionBackend, spec: AttentionSpec) -> str | None:
    """Why ``backend`` may not be given ``spec``'s cache: a quantized (FP8) cache for a
    backend that does not set :attr:`AttentionBackend.supports_fp8_kv_cache`. Checked by
    the base :meth:`AttentionBackend.cannot_serve` and again by backend selection, so an
    override that skips ``super()`` cannot be handed a cache it would misread."""
    if steps.is_quantized_kv_cache(spec.kv_cache_dtype) and not backend.supports_fp8_kv_cache:
        return (
            f"kv_cache_dtype {spec.kv_cache_dtype}: backend {backend.name!r} does not read "
            "FP8 KV caches (it does not set supports_fp8_kv_cache)"
        )
    return None


class AttentionImpl:
    """The per-layer callable built by :meth:`AttentionBackend.make_impl`.

    :meth:`forward` is the same for every backend: write the step's new keys and values
    into the cache with ``write_kv_cache``, then :meth:`attend`. A backend passes its
    cache writer (its ``reshape_and_cache``; the reference's by default) to ``__init__``
    and implements :meth:`attend`. (An implementation written before plugin API 1.4
    overrides :meth:`forward` itself, which keeps working.)

    With a quantized ``spec.kv_cache_dtype`` (float8_e4m3fn) the cache holds
    ``key / k_scale`` and ``value / v_scale``: :meth:`forward` passes the scales to the
    writer, and :meth:`attend` reads ``stored * scale`` (in float32, or with the scales
    folded into its arithmetic).
    """

    def __init__(
        self, spec: AttentionSpec, write_kv_cache: KVCacheWriter = reshape_and_cache
    ) -> None:
        self.spec = spec
        #: Query heads per KV head: query head ``h`` reads KV head ``h // group_size``.
        self.group_size = spec.num_heads // spec.num_kv_heads
        self.write_kv_cache = write_kv_cache
        #: Whether the cache is quantized (float8): writes and reads use the scales.
        self.quantizes_kv_cache = steps.is_quantized_kv_cache(spec.kv_cache_dtype)
        #: Per-tensor scales of this layer's keys and values in a quantized cache: 1.0,
        #: or the checkpoint's, set by the attention layer after loading and fixed from
        #: then on (captured graphs keep the values they were captured with). Ignored by
        #: a float cache.
        self.k_scale = 1.0
        self.v_scale = 1.0

    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_size]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_size]
        metadata: AttentionMetadata,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_size]
        """Write the new keys and values into ``kv_cache`` at ``metadata.slot_mapping``,
        then attend each new query causally over its sequence's cached context.

        Mutates ``kv_cache`` only at the slots of the new tokens.
        """
        if self.quantizes_kv_cache:
            self.write_kv_cache(
                key, value, kv_cache, metadata.slot_mapping, self.k_scale, self.v_scale
            )
        else:
            # Float caches keep the four-argument call writers before API 1.5 take.
            self.write_kv_cache(key, value, kv_cache, metadata.slot_mapping)
        return self.attend(query, kv_cache, metadata)

    def attend(
        self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata
    ) -> torch.Tensor:
        """Attend each new query over its sequence's tokens, already all in ``kv_cache``.

        ``query`` is ``[num_tokens, num_heads, head_size]`` and so is the result; the
        cache is ``[2, num_blocks, block_size, num_kv_heads, head_size]`` (0 keys,
        1 values, slot = ``block * block_size + offset`` through
        ``metadata.block_tables``). The queries of a sequence are its last
        ``query_len`` positions of ``seq_len``; each attends causally (within
        ``spec.sliding_window``, scores soft-capped by ``spec.logit_softcap``, scaled by
        ``spec.scale``). A quantized cache's keys and values are ``stored * k_scale``
        and ``stored * v_scale``. Rows of tokens that belong to no sequence are left
        undefined. Does not modify ``kv_cache``.
        """
        raise NotImplementedError(
            f"{type(self).__name__} implements neither attend() nor forward()"
        )
