"""Gemma 3 text models (``Gemma3ForCausalLM``, model_type ``gemma3_text``).

Gemma 2's architecture (:mod:`kvplane.models.gemma2`) with three changes: per-head
RMSNorms on queries and keys before rotary; sliding-window and full-attention layers
(every sixth layer full by default) use different rope settings, ``rope_local_base_freq``
without scaling for local layers and the global ``rope_theta`` with its rope scaling for
full layers; and attention scores are not soft-capped.
"""

from __future__ import annotations

import logging
from typing import Any

from kvplane.models.gemma2 import SLIDING, Gemma2ForCausalLM
from kvplane.models.layers.context import BuildContext
from kvplane.models.layers.rotary import rope_parameters

logger = logging.getLogger(__name__)

#: transformers' defaults when a config names no theta for a layer type.
_DEFAULT_THETA = {SLIDING: 10_000.0, "full_attention": 1_000_000.0}


def gemma3_rope_parameters(config: Any, layer_type: str) -> dict[str, Any]:
    """Rope settings for ``layer_type`` layers, with at least ``rope_type`` and
    ``rope_theta``.

    transformers 5 configs hold one dict per layer type in ``rope_parameters``; older
    ones hold the global ``rope_theta`` / ``rope_scaling`` plus ``rope_local_base_freq``
    for sliding layers, which never scale.
    """
    nested = getattr(config, "rope_parameters", None) or {}
    if layer_type in nested:
        params = dict(nested[layer_type] or {})
        params.setdefault("rope_theta", _DEFAULT_THETA[layer_type])
        params["rope_type"] = params.get("rope_type", params.get("type", "default"))
        return params
    if layer_type == SLIDING:
        local_theta = getattr(config, "rope_local_base_freq", None) or _DEFAULT_THETA[SLIDING]
        return {"rope_type": "default", "rope_theta": float(local_theta)}
    return rope_parameters(config)


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    """Gemma 3 text decoder plus LM head: :class:`Gemma2ForCausalLM` with q/k norms,
    rope settings per layer type and no attention soft-cap."""

    default_sliding_window_pattern = 6
    has_qk_norm = True

    def __init__(self, config: Any, ctx: BuildContext) -> None:
        if getattr(config, "attn_logit_softcapping", None) is not None:
            logger.warning("Gemma 3 ignores attn_logit_softcapping, as transformers does")
        super().__init__(config, ctx)

    def layer_rope_parameters(self, config: Any, layer_type: str) -> dict[str, Any]:
        return gemma3_rope_parameters(config, layer_type)

    def attention_logit_softcap(self, config: Any) -> float | None:
        # transformers' Gemma 3 never passes attn_logit_softcapping to its attention
        # (released checkpoints set it to null), so neither do we.
        return None
