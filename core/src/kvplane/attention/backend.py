"""The interface every attention backend implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch

from kvplane.attention.metadata import AttentionMetadata

if TYPE_CHECKING:
    # Annotation only: importing kvplane.plugins here would be circular, since the
    # plugin package imports this module.
    from kvplane.plugins.types import AttentionSpec


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

    @abstractmethod
    def cannot_serve(self, spec: AttentionSpec) -> str | None:
        """Return why this backend cannot serve ``spec``, or ``None`` if it can."""

    @abstractmethod
    def make_impl(self, spec: AttentionSpec) -> "AttentionImpl":
        """Build the per-layer implementation for ``spec`` (called once per layer)."""


class AttentionImpl(ABC):
    """The per-layer callable built by :meth:`AttentionBackend.make_impl`."""

    @abstractmethod
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
