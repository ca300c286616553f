"""Mistral: the Llama decoder with a sliding attention window on every layer."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from kvplane.models.llama import AttentionOptions, LlamaForCausalLM


class MistralForCausalLM(LlamaForCausalLM):
    """Llama plus ``config.sliding_window`` (None: full attention) on every layer, as
    transformers' Mistral applies it."""

    def attention_options(self, config: Any, layer_index: int) -> AttentionOptions:
        options = super().attention_options(config, layer_index)
        return replace(options, sliding_window=getattr(config, "sliding_window", None))
