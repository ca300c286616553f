"""Attention: the backend interface, the per-step metadata and the torch reference."""

from kvplane.attention.backend import AttentionBackend, AttentionImpl
from kvplane.attention.metadata import AttentionMetadata

__all__ = ["AttentionBackend", "AttentionImpl", "AttentionMetadata"]
