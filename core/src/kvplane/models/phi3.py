"""Phi-3 (and Phi-3.5 / Phi-4-mini): the Llama decoder with fused checkpoint matrices,
partial rotary, an optional sliding window and LongRoPE scaling.

The checkpoint stores ``qkv_proj`` and ``gate_up_proj`` already fused; they load into the
stacked layers whole (shard index None). ``partial_rotary_factor`` (in the rope
parameters) limits rotary to the leading channels of each head. With
``rope_type == "longrope"`` the decoder's rotary layers read rows of a two-regime table
(:mod:`kvplane.models.layers.longrope`, which states where that is exact) instead of
positions.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from kvplane.attention.metadata import AttentionMetadata
from kvplane.models.layers.context import BuildContext
from kvplane.models.layers.longrope import LongRopeRotaryEmbedding
from kvplane.models.llama import AttentionOptions, LlamaForCausalLM

#: Key of the one LongRoPE layer all layers share, among the model's rotary tables.
_LONGROPE = "longrope"


class Phi3ForCausalLM(LlamaForCausalLM):
    """Llama with fused weights, partial rotary, ``config.sliding_window``, LongRoPE."""

    stacked_params = (
        ("qkv_proj", "qkv_proj", None),
        ("gate_up_proj", "gate_up_proj", None),
    )

    def attention_options(self, config: Any, layer_index: int) -> AttentionOptions:
        options = super().attention_options(config, layer_index)
        factor = float(options.rope_parameters.get("partial_rotary_factor", 1.0))
        return replace(
            options,
            rotary_dim=int(options.head_size * factor),
            sliding_window=getattr(config, "sliding_window", None),
        )

    def make_rotary(
        self, config: Any, options: AttentionOptions, ctx: BuildContext
    ) -> torch.nn.Module:
        params = options.rope_parameters
        if params["rope_type"] != "longrope":
            return super().make_rotary(config, options, ctx)
        if _LONGROPE not in self._rotary_tables:
            params = {
                "original_max_position_embeddings": getattr(
                    config, "original_max_position_embeddings", None
                ),
                **params,
            }
            self._rotary_tables[_LONGROPE] = LongRopeRotaryEmbedding(
                options.head_size, options.rotary_dim, options.max_position, params, True, ctx
            )
        return self._rotary_tables[_LONGROPE]

    def forward(
        self, token_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata
    ) -> torch.Tensor:
        longrope = self._rotary_tables.get(_LONGROPE)
        if isinstance(longrope, LongRopeRotaryEmbedding):
            positions = longrope.table_rows(positions, metadata)
        return self.model(token_ids, positions, metadata)
