"""Gemma 2: sandwich norms, GeGLU, soft-capped logits, alternating sliding-window layers.

Compared with Llama: every norm scales by ``1 + weight``; each block normalises the
attention and feed-forward outputs as well as their inputs; the embedding is multiplied
by ``sqrt(hidden_size)``; attention scales by ``query_pre_attn_scalar ** -0.5`` and may
soft-cap its scores; the final logits may be soft-capped; and layers alternate between
sliding-window and full attention (``config.layer_types``).

Attention and MLP are Llama's (:mod:`kvplane.models.llama`) with Gemma's options; Gemma 3
(:mod:`kvplane.models.gemma3`) overrides the hooks of :class:`Gemma2ForCausalLM`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from typing import Any

import torch

from kvplane.attention.metadata import AttentionMetadata
from kvplane.models.base import CausalLM
from kvplane.models.layers.context import BuildContext
from kvplane.models.layers.embedding import LMHead
from kvplane.models.layers.norm import RMSNorm
from kvplane.models.layers.rotary import rope_parameters
from kvplane.models.llama import (
    AttentionOptions,
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaMLP,
    LlamaModel,
    default_rotary,
    llama_attention_options,
)

SLIDING = "sliding_attention"
FULL = "full_attention"


def gemma_layer_types(config: Any, default_pattern: int) -> list[str]:
    """``config.layer_types`` (one of "sliding_attention" / "full_attention" per layer),
    or, for configs without it, every ``pattern``-th layer full and the others sliding
    (``sliding_window_pattern``, else ``default_pattern``: 2 for Gemma 2, 6 for Gemma 3).
    """
    num_layers = config.num_hidden_layers
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        pattern = (
            getattr(config, "sliding_window_pattern", None)
            or getattr(config, "_sliding_window_pattern", None)
            or default_pattern
        )
        layer_types = [SLIDING if (i + 1) % pattern else FULL for i in range(num_layers)]
    layer_types = list(layer_types)
    if len(layer_types) != num_layers or not set(layer_types) <= {SLIDING, FULL}:
        raise ValueError(
            f"layer_types must name {num_layers} layers, each {SLIDING!r} or {FULL!r}; "
            f"got {layer_types}"
        )
    return layer_types


def embedding_scale(hidden_size: int, dtype: torch.dtype) -> float:
    """``sqrt(hidden_size)`` rounded to ``dtype`` as transformers does (float32 first,
    then the model dtype: 55.4256 becomes 55.5 in bfloat16), so scaled embeddings match."""
    return torch.tensor(hidden_size**0.5, dtype=torch.float32).to(dtype).item()


def fold_norm_offsets(model: torch.nn.Module, loaded: set[str]) -> None:
    """Gemma's RMSNorm scales by ``1 + weight``: add the 1 to every RMSNorm weight in
    ``loaded`` (names from :func:`load_named_weights`) so the platform's plain
    ``rms_norm`` op applies unchanged. Mutates those weights in place; call once per
    loaded tensor.

    The sum is rounded once to the model dtype, where transformers keeps ``1 + weight``
    in float32: exact in float32, within one rounding of the model dtype otherwise.
    """
    for name, module in model.named_modules():
        if isinstance(module, RMSNorm) and f"{name}.weight" in loaded:
            module.weight.data.copy_(module.weight.data.float() + 1.0)


class GemmaDecoderLayer(LlamaDecoderLayer):
    """Sandwich-norm block: ``h += post_attn_norm(attn(input_norm(h)))``, then
    ``h += post_ff_norm(mlp(pre_ff_norm(h)))``.

    As in Llama the residual stream is threaded through the fused add+norm ops: each
    call returns the un-added block output and the residual it belongs to.
    """

    def __init__(
        self, config: Any, ctx: BuildContext, self_attn: torch.nn.Module, mlp: torch.nn.Module
    ) -> None:
        super().__init__(config, ctx, self_attn, mlp)
        self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ctx)
        self.post_feedforward_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ctx)

    def forward(
        self,
        positions: torch.Tensor,  # [T]
        hidden: torch.Tensor,  # [T, hidden_size]
        residual: torch.Tensor | None,  # [T, hidden_size]
        metadata: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.post_attention_layernorm(self.self_attn(positions, hidden, metadata))
        hidden, residual = self.pre_feedforward_layernorm(hidden, residual)
        return self.post_feedforward_layernorm(self.mlp(hidden)), residual


class Gemma2Model(LlamaModel):
    """Llama's model with the embedding scaled by ``sqrt(hidden_size)``."""

    def __init__(
        self, config: Any, ctx: BuildContext, make_layer: Callable[[int], torch.nn.Module]
    ) -> None:
        super().__init__(config, ctx, make_layer)
        self.embed_scale = embedding_scale(config.hidden_size, ctx.dtype)

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, hidden_size]
        return self.embed_tokens(token_ids) * self.embed_scale


class Gemma2ForCausalLM(CausalLM):
    """Gemma 2 decoder plus LM head (tied to the embedding unless the config unties it)
    with ``final_logit_softcapping`` on the float32 logits.

    Subclasses adapt it through the class attributes and the methods before
    ``make_layer`` (see :class:`~kvplane.models.gemma3.Gemma3ForCausalLM`). Checkpoint
    norm weights ``w`` are held as ``1 + w`` once loaded (:func:`fold_norm_offsets`).
    """

    stacked_params = LlamaForCausalLM.stacked_params
    ignored_suffixes = LlamaForCausalLM.ignored_suffixes
    #: Layer-type period for configs without ``layer_types``.
    default_sliding_window_pattern = 2
    #: Whether attention normalises each query and key head (Gemma 3).
    has_qk_norm = False

    def __init__(self, config: Any, ctx: BuildContext) -> None:
        super().__init__()
        if getattr(config, "use_bidirectional_attention", False):
            raise ValueError("bidirectional Gemma (embedding models) is not supported")
        self.config = config
        self.layer_types = gemma_layer_types(config, self.default_sliding_window_pattern)
        # One cos/sin table per layer type, shared by its layers.
        self._rotary_tables: dict[str, torch.nn.Module] = {}
        self.model = Gemma2Model(config, ctx, lambda i: self.make_layer(config, i, ctx))
        self.is_tied = bool(getattr(config, "tie_word_embeddings", True))
        self.lm_head = LMHead(
            config.vocab_size,
            config.hidden_size,
            ctx,
            tied_to=self.model.embed_tokens if self.is_tied else None,
            final_logit_softcap=getattr(config, "final_logit_softcapping", None),
        )

    # -- hooks Gemma 3 overrides (called from __init__) ----------------------------------

    def layer_rope_parameters(self, config: Any, layer_type: str) -> dict[str, Any]:
        """Rope settings for layers of ``layer_type``; Gemma 2 uses one set for all."""
        return rope_parameters(config)

    def attention_logit_softcap(self, config: Any) -> float | None:
        return getattr(config, "attn_logit_softcapping", None)

    def attention_options(self, config: Any, layer_index: int) -> AttentionOptions:
        layer_type = self.layer_types[layer_index]
        return replace(
            llama_attention_options(config),
            rope_parameters=self.layer_rope_parameters(config, layer_type),
            sliding_window=config.sliding_window if layer_type == SLIDING else None,
            scale=float(config.query_pre_attn_scalar) ** -0.5,
            logit_softcap=self.attention_logit_softcap(config),
            qk_norm_eps=config.rms_norm_eps if self.has_qk_norm else None,
        )

    def make_layer(self, config: Any, layer_index: int, ctx: BuildContext) -> torch.nn.Module:
        options = self.attention_options(config, layer_index)
        layer_type = self.layer_types[layer_index]
        if layer_type not in self._rotary_tables:
            self._rotary_tables[layer_type] = default_rotary(options, ctx)
        attention = LlamaAttention(config, ctx, options, self._rotary_tables[layer_type])
        activation = getattr(config, "hidden_activation", None) or config.hidden_act
        return GemmaDecoderLayer(config, ctx, attention, LlamaMLP(config, ctx, activation))

    # -- the model contract (compute_logits: CausalLM's) ---------------------------------

    def forward(
        self, token_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata
    ) -> torch.Tensor:
        return self.model(token_ids, positions, metadata)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded = super().load_weights(self._skip_tied_head(weights))
        fold_norm_offsets(self, loaded)
        return loaded

    def _skip_tied_head(
        self, weights: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        # Some tied checkpoints also store the shared matrix as lm_head.weight.
        for name, tensor in weights:
            if not (self.is_tied and name == "lm_head.weight"):
                yield name, tensor
