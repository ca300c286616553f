"""Qwen 2 (and 2.5): the Llama decoder with biased q/k/v projections.

Sliding windows, when the config turns them on (``use_sliding_window``), apply to the
layers ``config.layer_types`` marks "sliding_attention" (transformers derives those from
``max_window_layers``: layers at or past it).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from kvplane.models.llama import AttentionOptions, LlamaForCausalLM, layer_sliding_window


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Llama with q/k/v bias, no output-projection bias, per-layer sliding windows."""

    def attention_options(self, config: Any, layer_index: int) -> AttentionOptions:
        return replace(
            super().attention_options(config, layer_index),
            qkv_bias=True,
            o_proj_bias=False,
            sliding_window=layer_sliding_window(config, layer_index),
        )
