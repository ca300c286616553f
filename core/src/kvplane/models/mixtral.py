"""Mixtral: the Mistral decoder with a sparse mixture-of-experts MLP in every layer.

The router softmaxes over ``num_local_experts``, keeps ``num_experts_per_tok`` and
renormalises them to sum to one. Checkpoints name the block ``block_sparse_moe`` and the
experts' matrices ``experts.{e}.w1`` (gate), ``w3`` (up) and ``w2`` (down); they load
into :class:`~kvplane.models.layers.moe.FusedMoE` under the decoder layer's ``mlp``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from kvplane.models.layers.context import BuildContext
from kvplane.models.layers.moe import MIXTRAL_EXPERT_NAMES, ExpertWeightLoader, FusedMoE
from kvplane.models.mistral import MistralForCausalLM


class MixtralForCausalLM(MistralForCausalLM):
    """Mistral (sliding window from the config) with a top-k routed MoE as every MLP."""

    def make_mlp(self, config: Any, layer_index: int, ctx: BuildContext) -> torch.nn.Module:
        return FusedMoE(
            num_experts=config.num_local_experts,
            top_k=config.num_experts_per_tok,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            hidden_act=config.hidden_act,
            renormalize=True,
            ctx=ctx,
            prefix=f"{self.layer_prefix(layer_index)}.block_sparse_moe",
            expert_names=MIXTRAL_EXPERT_NAMES,
        )

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # Experts are matched by their checkpoint names (errors name those); the router
        # moves to the decoder layer's ``mlp``.
        experts = ExpertWeightLoader(self, MIXTRAL_EXPERT_NAMES)
        rest = experts.intercept(weights)
        renamed = ((name.replace(".block_sparse_moe.", ".mlp."), t) for name, t in rest)
        return super().load_weights(renamed) | experts.loaded_names()
