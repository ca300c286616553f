"""Qwen3-MoE: the Qwen 3 decoder (per-head q/k norm) with mixture-of-experts MLPs.

Layer ``i`` is sparse unless it is listed in ``mlp_only_layers`` or ``(i + 1)`` is not a
multiple of ``decoder_sparse_step``; dense layers keep a SwiGLU MLP of
``intermediate_size``. Experts have ``moe_intermediate_size``; the router keeps
``num_experts_per_tok`` of ``num_experts`` and renormalises them only with
``norm_topk_prob``. Checkpoint experts are ``mlp.experts.{e}.gate_proj/up_proj/down_proj``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from kvplane.models.layers.context import BuildContext
from kvplane.models.layers.moe import QWEN_EXPERT_NAMES, ExpertWeightLoader, FusedMoE
from kvplane.models.qwen3 import Qwen3ForCausalLM


def is_sparse_layer(config: Any, layer_index: int) -> bool:
    """Whether layer ``layer_index`` has experts, as transformers decides it."""
    return (
        layer_index not in (getattr(config, "mlp_only_layers", None) or ())
        and config.num_experts > 0
        and (layer_index + 1) % config.decoder_sparse_step == 0
    )


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    """Qwen 3 whose MLPs are top-k routed experts (except the configured dense layers)."""

    def make_mlp(self, config: Any, layer_index: int, ctx: BuildContext) -> torch.nn.Module:
        if not is_sparse_layer(config, layer_index):
            return super().make_mlp(config, layer_index, ctx)
        return FusedMoE(
            num_experts=config.num_experts,
            top_k=config.num_experts_per_tok,
            hidden_size=config.hidden_size,
            intermediate_size=config.moe_intermediate_size,
            hidden_act=config.hidden_act,
            renormalize=bool(config.norm_topk_prob),
            ctx=ctx,
            prefix=f"{self.layer_prefix(layer_index)}.mlp",
            expert_names=QWEN_EXPERT_NAMES,
        )

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        experts = ExpertWeightLoader(self, QWEN_EXPERT_NAMES)
        return super().load_weights(experts.intercept(weights)) | experts.loaded_names()
