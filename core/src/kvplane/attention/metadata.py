"""Per-step batch description handed to every attention backend."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class AttentionMetadata:
    """A flattened, unpadded batch of ``num_seqs`` sequences and ``num_tokens`` new tokens.

    Sequence ``i`` contributes the new tokens ``query_start_loc[i]:query_start_loc[i+1]``;
    they are the *last* ``query_len`` tokens of its ``seq_lens[i]`` tokens, the earlier ones
    being already in the KV cache. A sequence may have no new token (padding under
    captured graphs): it produces no output. Built once per step by the model runner and
    shared by every layer; backends must not mutate it.
    """

    slot_mapping: torch.Tensor  # [num_tokens] int64, cache slot of each new token (-1: skip)
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32, context length including the new tokens
    block_tables: torch.Tensor  # [num_seqs, max_num_blocks_per_seq] int32
    max_query_len: int
    max_seq_len: int
    # Host copies so reference backends can loop without a device sync.
    query_start_loc_cpu: tuple[int, ...]
    seq_lens_cpu: tuple[int, ...]

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def num_tokens(self) -> int:
        return self.query_start_loc_cpu[-1]

    @property
    def is_pure_decode(self) -> bool:
        return self.max_query_len == 1
