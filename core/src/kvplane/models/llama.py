"""The Llama family (Llama 2/3, SmolLM2, ...): pre-norm decoder, GQA, SwiGLU, rotary."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from kvplane.attention.metadata import AttentionMetadata
from kvplane.models.layers.activation import GatedActivation
from kvplane.models.layers.attention import Attention
from kvplane.models.layers.context import BuildContext
from kvplane.models.layers.embedding import LMHead, VocabEmbedding
from kvplane.models.layers.linear import Linear
from kvplane.models.layers.norm import RMSNorm
from kvplane.models.layers.rotary import RotaryEmbedding, rope_parameters
from kvplane.models.weights import load_named_weights


class LlamaAttention(torch.nn.Module):
    def __init__(self, config: Any, ctx: BuildContext) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_size = getattr(config, "head_dim", None) or (config.hidden_size // self.num_heads)
        bias = bool(getattr(config, "attention_bias", False))
        self.qkv_proj = Linear(
            config.hidden_size,
            (
                self.num_heads * self.head_size,
                self.num_kv_heads * self.head_size,
                self.num_kv_heads * self.head_size,
            ),
            bias,
            ctx,
        )
        self.o_proj = Linear(self.num_heads * self.head_size, (config.hidden_size,), bias, ctx)
        self.rotary_emb = RotaryEmbedding(
            self.head_size,
            self.head_size,
            config.max_position_embeddings,
            rope_parameters(config),
            is_neox_style=True,
            ctx=ctx,
        )
        self.attn = Attention(
            self.num_heads, self.num_kv_heads, self.head_size, self.head_size**-0.5, ctx
        )

    def forward(
        self,
        positions: torch.Tensor,  # [T]
        hidden: torch.Tensor,  # [T, hidden_size]
        metadata: AttentionMetadata,
    ) -> torch.Tensor:  # [T, hidden_size]
        num_tokens = hidden.shape[0]
        qkv = self.qkv_proj(hidden)
        query, key, value = qkv.split(self.qkv_proj.output_sizes, dim=-1)
        query = query.view(num_tokens, self.num_heads, self.head_size)
        key = key.view(num_tokens, self.num_kv_heads, self.head_size)
        value = value.view(num_tokens, self.num_kv_heads, self.head_size)
        query, key = self.rotary_emb(positions, query, key)
        attn_out = self.attn(query, key, value, metadata)  # [T, num_heads, head_size]
        return self.o_proj(attn_out.reshape(num_tokens, self.num_heads * self.head_size))


class LlamaMLP(torch.nn.Module):
    def __init__(self, config: Any, ctx: BuildContext) -> None:
        super().__init__()
        bias = bool(getattr(config, "mlp_bias", False))
        intermediate = config.intermediate_size
        self.gate_up_proj = Linear(config.hidden_size, (intermediate, intermediate), bias, ctx)
        self.down_proj = Linear(intermediate, (config.hidden_size,), bias, ctx)
        self.act_fn = GatedActivation(config.hidden_act, ctx)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(hidden)))


class LlamaDecoderLayer(torch.nn.Module):
    def __init__(self, config: Any, ctx: BuildContext) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, ctx)
        self.mlp = LlamaMLP(config, ctx)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ctx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ctx)

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        metadata: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, metadata)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(torch.nn.Module):
    def __init__(self, config: Any, ctx: BuildContext) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size, ctx)
        self.layers = torch.nn.ModuleList(
            LlamaDecoderLayer(config, ctx) for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, ctx)

    def forward(
        self, token_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata
    ) -> torch.Tensor:  # [T, hidden_size]
        hidden = self.embed_tokens(token_ids)
        residual: torch.Tensor | None = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, metadata)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(torch.nn.Module):
    """Llama decoder plus LM head; the contract every kvplane model follows:

    ``forward(token_ids [T], positions [T], metadata) -> hidden [T, hidden_size]``,
    ``compute_logits(hidden [S, hidden_size]) -> [S, vocab_size] float32`` and
    ``load_weights(named tensors) -> names loaded``.
    """

    #: Checkpoint matrices stacked into one kvplane layer: (ours, theirs, shard index).
    stacked_params = (
        ("qkv_proj", "q_proj", 0),
        ("qkv_proj", "k_proj", 1),
        ("qkv_proj", "v_proj", 2),
        ("gate_up_proj", "gate_proj", 0),
        ("gate_up_proj", "up_proj", 1),
    )
    #: Checkpoint tensors that carry nothing the model needs.
    ignored_suffixes = ("rotary_emb.inv_freq",)

    def __init__(self, config: Any, ctx: BuildContext) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, ctx)
        tied = self.model.embed_tokens if getattr(config, "tie_word_embeddings", False) else None
        self.lm_head = LMHead(config.vocab_size, config.hidden_size, ctx, tied_to=tied)

    def forward(
        self, token_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata
    ) -> torch.Tensor:
        return self.model(token_ids, positions, metadata)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_named_weights(self, weights, self.stacked_params, self.ignored_suffixes)
