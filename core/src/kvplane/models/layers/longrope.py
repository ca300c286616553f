"""LongRoPE rotary embedding (Phi-3 and its descendants): two frequency sets, one per
context regime.

transformers rotates with the ``short_factor`` frequencies while a sequence is at most
``original_max_position_embeddings`` long, and with the ``long_factor`` ones for every
position once it is longer (recomputing the whole cache at the switch). Here both
cos/sin tables live in one cache, short rows ``[0, max_position)`` then long rows
``[max_position, 2 * max_position)``, and :meth:`LongRopeRotaryEmbedding.table_rows`
picks the row of each token from its sequence's current length.

That matches transformers exactly while no sequence crosses the original length part
way: a sequence that does keeps the keys it cached with short frequencies (transformers
recomputes them), and a long prompt prefilled in several chunks rotates its early chunks
with short frequencies. Prefix-cache hits across the two regimes mix them as well.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from kvplane.attention.metadata import AttentionMetadata
from kvplane.models.layers.context import BuildContext


class LongRopeRotaryEmbedding(torch.nn.Module):
    """Rotary embedding whose ``positions`` argument is a row of the two-regime table,
    from :meth:`table_rows`; same call signature as
    :class:`~kvplane.models.layers.rotary.RotaryEmbedding`."""

    def __init__(
        self,
        head_size: int,
        rotary_dim: int,
        max_position: int,
        params: dict[str, Any],
        is_neox_style: bool,
        ctx: BuildContext,
    ) -> None:
        super().__init__()
        half = rotary_dim // 2
        for name in ("short_factor", "long_factor"):
            if len(params.get(name) or ()) != half:
                raise ValueError(f"longrope {name} must list {half} numbers (rotary_dim / 2)")
        original = params.get("original_max_position_embeddings")
        if original is None:
            raise ValueError("longrope needs original_max_position_embeddings")
        self.original_max_position = int(original)
        self.max_position = max_position
        factor = params.get("factor") or max_position / self.original_max_position
        attention_factor = params.get("attention_factor")
        if attention_factor is None:
            attention_factor = (
                1.0
                if factor <= 1.0
                else math.sqrt(1 + math.log(factor) / math.log(self.original_max_position))
            )
        base = float(params["rope_theta"])
        exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
        positions = torch.arange(max_position, dtype=torch.float32)
        tables = []
        for name in ("short_factor", "long_factor"):
            scales = torch.tensor(params[name], dtype=torch.float32)
            inv_freq = 1.0 / (scales * base**exponents)  # [rotary_dim // 2]
            angles = torch.outer(positions, inv_freq)  # [max_position, rotary_dim // 2]
            tables.append(torch.cat((angles.cos(), angles.sin()), dim=-1) * attention_factor)
        # [2 * max_position, rotary_dim]: short rows, then long rows.
        self.register_buffer("cos_sin_cache", torch.cat(tables).to(ctx.device), persistent=False)
        self.head_size = head_size
        self.is_neox_style = is_neox_style
        self._rotary_embedding = ctx.platform.ops.rotary_embedding

    def table_rows(
        self,
        positions: torch.Tensor,  # [T]
        metadata: AttentionMetadata,
    ) -> torch.Tensor:  # [T]
        """Per token, its position, shifted into the long table when its sequence
        (``metadata.seq_lens``, this step's tokens included) is longer than the original
        context. Device ops only: no host sync."""
        num_tokens = positions.shape[0]
        starts = metadata.query_start_loc  # [num_seqs + 1] int32
        token_index = torch.arange(num_tokens, dtype=starts.dtype, device=positions.device)
        seq_index = torch.searchsorted(starts[1:].contiguous(), token_index, right=True)
        seq_index = seq_index.clamp_(max=metadata.seq_lens.shape[0] - 1)  # padded tokens
        is_long = metadata.seq_lens[seq_index] > self.original_max_position  # [T]
        return positions + is_long.to(positions.dtype) * self.max_position

    def forward(
        self,
        rows: torch.Tensor,  # [num_tokens], from table_rows
        query: torch.Tensor,  # [num_tokens, num_heads, head_size]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._rotary_embedding(rows, query, key, self.cos_sin_cache, self.is_neox_style)
