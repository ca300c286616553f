"""Acme's attention backend: the first hook a new platform implements.

Deliberately simple: one sequence at a time, the sequence's keys and values read out of
the paged cache, then a masked softmax. A real vendor calls its kernels instead; the
contract stays the same (:class:`kvplane.attention.backend.AttentionImpl`):

- the KV cache of a layer is ``[2, num_blocks, block_size, num_kv_heads, head_size]``
  (0 keys, 1 values), and the slot of a token is ``block * block_size + offset``;
- the core's ``forward`` first writes the new keys and values at
  ``metadata.slot_mapping`` with the writer given to ``__init__`` (here
  :func:`write_kv`), then calls :meth:`AcmeAttentionImpl.attend`, which attends each new
  query causally over all of its sequence's tokens (the cached ones and the new ones,
  which are the last ``query_len`` of ``seq_len``).

:meth:`AcmeAttentionBackend.cannot_serve` shows how a backend declines what it does not
support: kvplane logs the reason and uses the next candidate (here the core's reference).
"""

from __future__ import annotations

import torch

from kvplane.attention.backend import AttentionBackend, AttentionImpl
from kvplane.attention.metadata import AttentionMetadata
from kvplane.plugins.types import AttentionSpec

SUPPORTED_HEAD_SIZES = (64, 80, 96, 128, 256)


class AcmeAttentionBackend(AttentionBackend):
    """Causal paged attention without sliding window or logit softcap."""

    name = "acme"
    priority = 10  # above the reference's -1000

    def cannot_serve(self, spec: AttentionSpec) -> str | None:
        if spec.sliding_window is not None:
            return "Acme attention does not support sliding_window yet"
        if spec.logit_softcap is not None:
            return "Acme attention does not support logit_softcap yet"
        if spec.head_size not in SUPPORTED_HEAD_SIZES:
            return f"head_size {spec.head_size} not in {SUPPORTED_HEAD_SIZES}"
        return super().cannot_serve(spec)  # what every backend checks (GQA grouping)

    def make_impl(self, spec: AttentionSpec) -> AttentionImpl:
        return AcmeAttentionImpl(spec)


class AcmeAttentionImpl(AttentionImpl):
    def __init__(self, spec: AttentionSpec) -> None:
        super().__init__(spec, write_kv)  # the core's forward writes with it, then attends

    def attend(
        self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata
    ) -> torch.Tensor:
        output = torch.empty_like(query)  # [num_tokens, num_heads, head_size]
        starts = metadata.query_start_loc_cpu  # host copies: no device sync to loop
        for seq_index, seq_len in enumerate(metadata.seq_lens_cpu):
            start, end = starts[seq_index], starts[seq_index + 1]
            if end > start:
                keys, values = read_kv(kv_cache, metadata.block_tables[seq_index], seq_len)
                output[start:end] = self.attend_sequence(query[start:end], keys, values)
        return output

    def attend_sequence(
        self,
        query: torch.Tensor,  # [query_len, num_heads, head_size]
        keys: torch.Tensor,  # [seq_len, num_kv_heads, head_size]
        values: torch.Tensor,  # [seq_len, num_kv_heads, head_size]
    ) -> torch.Tensor:  # [query_len, num_heads, head_size]
        query_len, seq_len = query.shape[0], keys.shape[0]
        # Query head h reads KV head h // group_size.
        keys = keys.float().repeat_interleave(self.group_size, dim=1)  # [seq_len, H, D]
        values = values.float().repeat_interleave(self.group_size, dim=1)
        scores = torch.einsum("qhd,khd->hqk", query.float(), keys) * self.spec.scale
        # The new queries are the last positions: query i sits at seq_len - query_len + i.
        causal = torch.ones(query_len, seq_len, dtype=torch.bool, device=query.device)
        causal = causal.tril(diagonal=seq_len - query_len)
        probs = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
        return torch.einsum("hqk,khd->qhd", probs, values).to(query.dtype)


def write_kv(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_size]
    slot_mapping: torch.Tensor,  # [num_tokens] int64, < 0: padding, not written
) -> None:
    """Write each new token's key and value at its slot, in place."""
    # A view (never a copy), so the writes land in the cache.
    slots_view = kv_cache.view(2, -1, *kv_cache.shape[-2:])  # [2, num_slots, kv_heads, D]
    keep = slot_mapping >= 0
    slots_view[0, slot_mapping[keep]] = key[keep].to(kv_cache.dtype)
    slots_view[1, slot_mapping[keep]] = value[keep].to(kv_cache.dtype)


def read_kv(
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_size]
    block_table: torch.Tensor,  # [max_num_blocks_per_seq] int32
    seq_len: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # each [seq_len, num_kv_heads, head_size]
    """One sequence's keys and values, in order, out of its blocks."""
    block_size = kv_cache.shape[2]
    num_blocks = -(-seq_len // block_size)  # ceil
    blocks = kv_cache[:, block_table[:num_blocks].long()]  # [2, n, block_size, kv_heads, D]
    keys_values = blocks.flatten(1, 2)[:, :seq_len]
    return keys_values[0], keys_values[1]
