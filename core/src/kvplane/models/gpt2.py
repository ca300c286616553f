"""GPT-2: learned position embeddings, LayerNorm, non-gated GELU MLP, no rotary.

The checkpoint's ``Conv1D`` weights are stored transposed (``[in, out]``); ``c_attn``
holds q, k and v fused, with bias. Names come with a ``transformer.`` prefix (as
transformers saves them) or without (the original ``gpt2`` upload: ``h.0.attn...``);
both load. The LM head is tied to the token embedding unless the config unties it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from kvplane.attention.metadata import AttentionMetadata
from kvplane.models.base import CausalLM
from kvplane.models.layers.activation import Activation
from kvplane.models.layers.attention import Attention
from kvplane.models.layers.context import BuildContext
from kvplane.models.layers.embedding import LMHead, VocabEmbedding
from kvplane.models.layers.linear import Linear
from kvplane.models.layers.norm import LayerNorm

#: Modules whose checkpoint weights are transformers ``Conv1D`` ([in, out]).
_CONV1D_MODULES = ("c_attn", "c_proj", "c_fc")


class GPT2Attention(torch.nn.Module):
    def __init__(self, config: Any, layer_index: int, ctx: BuildContext) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_size = hidden // self.num_heads
        scale = self.head_size**-0.5 if getattr(config, "scale_attn_weights", True) else 1.0
        if getattr(config, "scale_attn_by_inverse_layer_idx", False):
            scale /= float(layer_index + 1)
        self.c_attn = Linear(hidden, (hidden, hidden, hidden), True, ctx)
        self.c_proj = Linear(hidden, (hidden,), True, ctx)
        self.attn = Attention(self.num_heads, self.num_heads, self.head_size, scale, ctx)

    def forward(
        self,
        hidden: torch.Tensor,  # [T, hidden_size]
        metadata: AttentionMetadata,
    ) -> torch.Tensor:  # [T, hidden_size]
        num_tokens = hidden.shape[0]
        shape = (num_tokens, self.num_heads, self.head_size)
        query, key, value = self.c_attn(hidden).split(self.c_attn.output_sizes, dim=-1)
        attn_out = self.attn(
            query.reshape(shape), key.reshape(shape), value.reshape(shape), metadata
        )  # [T, num_heads, head_size]
        return self.c_proj(attn_out.reshape(num_tokens, -1))


class GPT2MLP(torch.nn.Module):
    def __init__(self, config: Any, ctx: BuildContext) -> None:
        super().__init__()
        hidden = config.hidden_size
        inner = getattr(config, "n_inner", None) or 4 * hidden
        self.c_fc = Linear(hidden, (inner,), True, ctx)
        self.c_proj = Linear(inner, (hidden,), True, ctx)
        self.act = Activation(config.activation_function, ctx)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, H]
        return self.c_proj(self.act(self.c_fc(hidden)))


class GPT2Block(torch.nn.Module):
    """Pre-LayerNorm block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    def __init__(self, config: Any, layer_index: int, ctx: BuildContext) -> None:
        super().__init__()
        eps = config.layer_norm_epsilon
        self.ln_1 = LayerNorm(config.hidden_size, eps, ctx)
        self.attn = GPT2Attention(config, layer_index, ctx)
        self.ln_2 = LayerNorm(config.hidden_size, eps, ctx)
        self.mlp = GPT2MLP(config, ctx)

    def forward(self, hidden: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        hidden = hidden + self.attn(self.ln_1(hidden), metadata)
        return hidden + self.mlp(self.ln_2(hidden))


class GPT2Model(torch.nn.Module):
    def __init__(self, config: Any, ctx: BuildContext) -> None:
        super().__init__()
        self.wte = VocabEmbedding(config.vocab_size, config.hidden_size, ctx)
        self.wpe = VocabEmbedding(config.max_position_embeddings, config.hidden_size, ctx)
        self.h = torch.nn.ModuleList(
            GPT2Block(config, i, ctx) for i in range(config.num_hidden_layers)
        )
        self.ln_f = LayerNorm(config.hidden_size, config.layer_norm_epsilon, ctx)

    def forward(
        self, token_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata
    ) -> torch.Tensor:  # [T, hidden_size]
        hidden = self.wte(token_ids) + self.wpe(positions)
        for block in self.h:
            hidden = block(hidden, metadata)
        return self.ln_f(hidden)


class GPT2LMHeadModel(CausalLM):
    """GPT-2 with its (normally tied) LM head."""

    #: ``c_attn`` is stored fused: it fills all three shards (q, k, v) at once.
    stacked_params = (("c_attn", "c_attn", None),)
    #: The causal-mask buffers older checkpoints saved as ``h.N.attn.bias`` / ``masked_bias``.
    ignored_suffixes = (".attn.bias", ".attn.masked_bias")

    def __init__(self, config: Any, ctx: BuildContext) -> None:
        super().__init__()
        if getattr(config, "add_cross_attention", False):
            raise ValueError("GPT-2 with cross-attention (an encoder-decoder) is not supported")
        self.config = config
        self.transformer = GPT2Model(config, ctx)
        self.is_tied = bool(getattr(config, "tie_word_embeddings", True))
        tied = self.transformer.wte if self.is_tied else None
        self.lm_head = LMHead(config.vocab_size, config.hidden_size, ctx, tied_to=tied)

    def forward(
        self, token_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata
    ) -> torch.Tensor:
        return self.transformer(token_ids, positions, metadata)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return super().load_weights(self._normalized(weights))

    def _normalized(
        self, weights: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Checkpoint names with the ``transformer.`` prefix, Conv1D weights as
        ``[out, in]``, and a tied model's saved copy of the embedding dropped."""
        for name, tensor in weights:
            if name == "lm_head.weight" and self.is_tied:
                continue
            if not name.startswith(("transformer.", "lm_head.")):
                name = f"transformer.{name}"
            module_path, _, kind = name.rpartition(".")
            if kind == "weight" and module_path.endswith(_CONV1D_MODULES):
                tensor = tensor.t()
            yield name, tensor
