"""Architecture name (``architectures`` in config.json) to model class."""

from __future__ import annotations

import importlib
from typing import Any

import torch

#: Supported architectures and where their class lives (imported on first use).
_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "kvplane.models.llama:LlamaForCausalLM",
}

#: ``model_type`` fallbacks for configs without ``architectures`` (e.g. from GGUF).
_MODEL_TYPES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
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


def model_class(architecture: str) -> type[torch.nn.Module]:
    module_name, _, class_name = _ARCHITECTURES[architecture].partition(":")
    return getattr(importlib.import_module(module_name), class_name)
