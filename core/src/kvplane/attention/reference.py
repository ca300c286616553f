"""Plain-torch paged attention: the semantics every attention backend must match."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from kvplane.attention.backend import AttentionBackend, AttentionImpl
from kvplane.attention.metadata import AttentionMetadata
from kvplane.ops import steps

if TYPE_CHECKING:
    # Annotation only: importing kvplane.plugins here would be circular, since the
    # plugin package imports this module.
    from kvplane.plugins.types import AttentionSpec


class ReferenceAttentionBackend(AttentionBackend):
    """Serves every spec, one sequence at a time; the fallback of last resort."""

    name = "reference"
    priority = -1000
    supports_fp8_kv_cache = True

    def make_impl(self, spec: AttentionSpec) -> AttentionImpl:
        return ReferenceAttentionImpl(spec)


class ReferenceAttentionImpl(AttentionImpl):
    """Writes the cache with the reference ``reshape_and_cache`` (the base's default);
    a quantized cache's keys and values are dequantized to float32 before attending."""

    def attend(
        self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata
    ) -> torch.Tensor:
        output = torch.empty_like(query)
        starts = metadata.query_start_loc_cpu
        for seq_index, seq_len in enumerate(metadata.seq_lens_cpu):
            start, end = starts[seq_index], starts[seq_index + 1]
            if end == start:
                continue
            seq_keys, seq_values = gather_sequence_kv(
                kv_cache, metadata.block_tables[seq_index], seq_len
            )
            if self.quantizes_kv_cache:
                seq_keys = steps.dequantize_kv(seq_keys, self.k_scale)
                seq_values = steps.dequantize_kv(seq_values, self.v_scale)
            output[start:end] = attend(query[start:end], seq_keys, seq_values, self.spec)
        return output


def gather_sequence_kv(
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_size]
    block_table: torch.Tensor,  # [max_num_blocks_per_seq]
    seq_len: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # each [seq_len, num_kv_heads, head_size]
    """Read one sequence's first ``seq_len`` keys and values out of the paged cache."""
    block_size = kv_cache.shape[2]
    num_blocks = math.ceil(seq_len / block_size)
    block_ids = block_table[:num_blocks].long()
    keys = kv_cache[0].index_select(0, block_ids).flatten(0, 1)[:seq_len]
    values = kv_cache[1].index_select(0, block_ids).flatten(0, 1)[:seq_len]
    return keys, values


def attend(
    query: torch.Tensor,  # [query_len, num_heads, head_size]
    keys: torch.Tensor,  # [seq_len, num_kv_heads, head_size]
    values: torch.Tensor,  # [seq_len, num_kv_heads, head_size]
    spec: AttentionSpec,
) -> torch.Tensor:  # [query_len, num_heads, head_size]
    """Causal attention of the last ``query_len`` positions of a sequence over all of it."""
    query_len, seq_len = query.shape[0], keys.shape[0]
    group_size = spec.num_heads // spec.num_kv_heads
    keys = keys.float().repeat_interleave(group_size, dim=1)  # [seq_len, num_heads, D]
    values = values.float().repeat_interleave(group_size, dim=1)
    scores = torch.einsum("qhd,khd->hqk", query.float(), keys) * spec.scale
    if spec.logit_softcap is not None:
        scores = spec.logit_softcap * torch.tanh(scores / spec.logit_softcap)
    query_positions = torch.arange(seq_len - query_len, seq_len).unsqueeze(1)  # [q, 1]
    key_positions = torch.arange(seq_len).unsqueeze(0)  # [1, k]
    allowed = key_positions <= query_positions
    if spec.sliding_window is not None:
        allowed &= key_positions > query_positions - spec.sliding_window
    scores = scores.masked_fill(~allowed.to(scores.device), float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, values).to(query.dtype)
