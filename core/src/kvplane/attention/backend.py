"""The interface every attention backend implements, and what all of them share."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from kvplane.attention.metadata import AttentionMetadata
from kvplane.ops.reference import reshape_and_cache

if TYPE_CHECKING:
    # Annotation only: importing kvplane.plugins here would be circular, since the
    # plugin package imports this module.
    from kvplane.plugins.types import AttentionSpec

#: Writes new keys and values into a layer's cache at their slots, in place:
#: ``(key, value, kv_cache, slot_mapping) -> None`` with the shapes and semantics of
#: :func:`kvplane.ops.reference.reshape_and_cache` (slots < 0 are skipped).
KVCacheWriter = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


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

    def cannot_serve(self, spec: AttentionSpec) -> str | None:
        """Return why this backend cannot serve ``spec``, or ``None`` if it can.

        The base checks what every backend needs: the query heads split evenly over the
        KV heads (:attr:`AttentionImpl.group_size`). A backend with limits of its own
        overrides this and returns ``super().cannot_serve(spec)`` where its checks allow.
        """
        if spec.num_heads % spec.num_kv_heads != 0:
            return f"num_heads {spec.num_heads} not a multiple of {spec.num_kv_heads}"
        return None

    @abstractmethod
    def make_impl(self, spec: AttentionSpec) -> AttentionImpl:
        """Build the per-layer implementation for ``spec`` (called once per layer)."""


class AttentionImpl:
    """The per-layer callable built by :meth:`AttentionBackend.make_impl`.

    :meth:`forward` is the same for every backend: write the step's new keys and values
    into the cache with ``write_kv_cache``, then :meth:`attend`. A backend passes its
    cache writer (its ``reshape_and_cache``; the reference's by default) to ``__init__``
    and implements :meth:`attend`. (An implementation written before plugin API 1.4
    overrides :meth:`forward` itself, which keeps working.)
    """

    def __init__(
        self, spec: AttentionSpec, write_kv_cache: KVCacheWriter = reshape_and_cache
    ) -> None:
        self.spec = spec
        #: Query heads per KV head: query head ``h`` reads KV head ``h // group_size``.
        self.group_size = spec.num_heads // spec.num_kv_heads
        self.write_kv_cache = write_kv_cache

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
        ``spec.scale``). Rows of tokens that belong to no sequence are left undefined.
        Does not modify ``kv_cache``.
        """
        raise NotImplementedError(
            f"{type(self).__name__} implements neither attend() nor forward()"
        )
