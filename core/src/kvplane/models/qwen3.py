"""Qwen 3 (dense): the Llama decoder with a per-head RMSNorm on query and key.

The norms (``self_attn.q_norm`` / ``k_norm``, one weight of ``head_dim``) run before
rotary; ``head_dim`` is explicit in the config and ``attention_bias`` covers all four
projections, as in Llama. Sliding windows follow ``config.layer_types`` as in Qwen 2.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from kvplane.models.llama import AttentionOptions, LlamaForCausalLM, layer_sliding_window


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Llama with q/k norm and per-layer sliding windows."""

    def attention_options(self, config: Any, layer_index: int) -> AttentionOptions:
        return replace(
            super().attention_options(config, layer_index),
            qk_norm_eps=config.rms_norm_eps,
            sliding_window=layer_sliding_window(config, layer_index),
        )
