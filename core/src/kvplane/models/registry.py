"""Architecture name (``architectures`` in config.json) to model class."""

from __future__ import annotations

import importlib
from typing import Any

from kvplane.models.base import CausalLM

#: Supported architectures and where their class lives (imported on first use).
_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "kvplane.models.llama:LlamaForCausalLM",
    "MistralForCausalLM": "kvplane.models.mistral:MistralForCausalLM",
    "Qwen2ForCausalLM": "kvplane.models.qwen2:Qwen2ForCausalLM",
    "Qwen3ForCausalLM": "kvplane.models.qwen3:Qwen3ForCausalLM",
    "Phi3ForCausalLM": "kvplane.models.phi3:Phi3ForCausalLM",
    "GPT2LMHeadModel": "kvplane.models.gpt2:GPT2LMHeadModel",
    "Gemma2ForCausalLM": "kvplane.models.gemma2:Gemma2ForCausalLM",
    "Gemma3ForCausalLM": "kvplane.models.gemma3:Gemma3ForCausalLM",
    "MixtralForCausalLM": "kvplane.models.mixtral:MixtralForCausalLM",
    "Qwen3MoeForCausalLM": "kvplane.models.qwen3_moe:Qwen3MoeForCausalLM",
}

#: ``model_type`` fallbacks for configs without ``architectures`` (e.g. from GGUF).
_MODEL_TYPES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}


def supported_architectures() -> list[str]:
    return sorted(_ARCHITECTURES)


def architecture_of(hf_config: Any) -> str:
    """The architecture name of ``hf_config``; ValueError listing supported ones if none fits."""
    for name in getattr(hf_config, "architectures", None) or []:
        if name in _ARCHITECTURES:
            return name
    model_type = getattr(hf_config, "model_type", None)
    if model_type in _MODEL_TYPES:
        return _MODEL_TYPES[model_type]
    asked = getattr(hf_config, "architectures", None) or model_type
    raise ValueError(
        f"unsupported architecture {asked!r}; supported: {', '.join(supported_architectures())}"
    )


def model_class(architecture: str) -> type[CausalLM]:
    """The class of ``architecture`` (a key of :func:`supported_architectures`)."""
    module_name, _, class_name = _ARCHITECTURES[architecture].partition(":")
    return getattr(importlib.import_module(module_name), class_name)
