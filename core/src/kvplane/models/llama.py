"""The Llama family (Llama 2/3, SmolLM2, ...): pre-norm decoder, GQA, SwiGLU, rotary.

The decoder is also the base of the Llama-like architectures (Mistral, Qwen 2/3,
Phi-3, ...). They subclass :class:`LlamaForCausalLM` and override its builder methods:
:meth:`~LlamaForCausalLM.attention_options` (biases, sliding window, q/k norm, rotary
width), :meth:`~LlamaForCausalLM.make_rotary`, :meth:`~LlamaForCausalLM.make_attention`,
:meth:`~LlamaForCausalLM.make_mlp` and :meth:`~LlamaForCausalLM.make_layer`. The
builders run inside ``__init__``, once per layer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kvplane.attention.metadata import AttentionMetadata
from kvplane.models.base import CausalLM
from kvplane.models.layers.activation import GatedActivation
from kvplane.models.layers.attention import Attention
from kvplane.models.layers.context import BuildContext
from kvplane.models.layers.embedding import LMHead, VocabEmbedding
from kvplane.models.layers.linear import Linear
from kvplane.models.layers.norm import RMSNorm
from kvplane.models.layers.rotary import RotaryEmbedding, rope_parameters


@dataclass(frozen=True, slots=True)
class AttentionOptions:
    """How one layer's attention block is built; derived from the config by
    :meth:`LlamaForCausalLM.attention_options`, which architectures override."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_size: int
    qkv_bias: bool
    o_proj_bias: bool
    #: Leading channels of each head that rotary embedding rotates (the rest pass).
    rotary_dim: int
    rope_parameters: dict[str, Any]
    max_position: int
    sliding_window: int | None = None
    #: Epsilon of a per-head RMSNorm on query and key before rotary (Qwen 3); None: no norm.
    qk_norm_eps: float | None = None
    #: Attention score scale; None: ``head_size ** -0.5`` (Gemma: ``query_pre_attn_scalar``).
    scale: float | None = None
    #: ``cap * tanh(scores / cap)`` before softmax (Gemma 2); None: no soft-cap.
    logit_softcap: float | None = None


def llama_attention_options(config: Any) -> AttentionOptions:
    """Llama's attention: ``attention_bias`` on all four projections, full rotary, no
    window. ``head_dim`` may be given explicitly (else ``hidden_size // heads``)."""
    num_heads = config.num_attention_heads
    head_size = getattr(config, "head_dim", None) or (config.hidden_size // num_heads)
    bias = bool(getattr(config, "attention_bias", False))
    return AttentionOptions(
        hidden_size=config.hidden_size,
        num_heads=num_heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
        head_size=head_size,
        qkv_bias=bias,
        o_proj_bias=bias,
        rotary_dim=head_size,
        rope_parameters=rope_parameters(config),
        max_position=config.max_position_embeddings,
    )


def layer_sliding_window(config: Any, layer_index: int) -> int | None:
    """The sliding window of layer ``layer_index``, transformers-style: with
    ``config.layer_types``, ``config.sliding_window`` for "sliding_attention" layers and
    None for the others; without it, ``config.sliding_window`` (None if absent).

    transformers folds Qwen 2's ``use_sliding_window`` / ``max_window_layers`` into
    ``layer_types`` and ``sliding_window`` (None when windows are off) when it builds the
    config, so this reads the settled result.
    """
    layer_types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if layer_types is None:
        return window
    return window if layer_types[layer_index] == "sliding_attention" else None


class LlamaAttention(torch.nn.Module):
    """QKV projection, optional per-head q/k norm, rotary, paged attention, output
    projection. ``options`` defaults to Llama's, ``rotary`` to a full-width
    :class:`RotaryEmbedding` for ``options``."""

    def __init__(
        self,
        config: Any,
        ctx: BuildContext,
        options: AttentionOptions | None = None,
        rotary: torch.nn.Module | None = None,
    ) -> None:
        super().__init__()
        options = options or llama_attention_options(config)
        self.num_heads = options.num_heads
        self.num_kv_heads = options.num_kv_heads
        self.head_size = options.head_size
        q_size = self.num_heads * self.head_size
        kv_size = self.num_kv_heads * self.head_size
        self.qkv_proj = Linear(
            options.hidden_size, (q_size, kv_size, kv_size), options.qkv_bias, ctx
        )
        self.o_proj = Linear(q_size, (options.hidden_size,), options.o_proj_bias, ctx)
        self.q_norm: RMSNorm | None = None
        self.k_norm: RMSNorm | None = None
        if options.qk_norm_eps is not None:
            self.q_norm = RMSNorm(self.head_size, options.qk_norm_eps, ctx)
            self.k_norm = RMSNorm(self.head_size, options.qk_norm_eps, ctx)
        self.rotary_emb = rotary or default_rotary(options, ctx)
        self.attn = Attention(
            self.num_heads,
            self.num_kv_heads,
            self.head_size,
            self.head_size**-0.5 if options.scale is None else options.scale,
            ctx,
            sliding_window=options.sliding_window,
            logit_softcap=options.logit_softcap,
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
        if self.q_norm is not None and self.k_norm is not None:
            # Per-head norms over [tokens, heads, head_size] views of the fused output:
            # the norm reads them in place (no copy of the slices first).
            query = self.q_norm(query.unflatten(-1, (self.num_heads, self.head_size)))
            key = self.k_norm(key.unflatten(-1, (self.num_kv_heads, self.head_size)))
        query = query.reshape(num_tokens, self.num_heads, self.head_size)
        key = key.reshape(num_tokens, self.num_kv_heads, self.head_size)
        value = value.reshape(num_tokens, self.num_kv_heads, self.head_size)
        query, key = self.rotary_emb(positions, query, key)
        attn_out = self.attn(query, key, value, metadata)  # [T, num_heads, head_size]
        return self.o_proj(attn_out.reshape(num_tokens, self.num_heads * self.head_size))


def default_rotary(options: AttentionOptions, ctx: BuildContext) -> RotaryEmbedding:
    """Neox-style rotary over the first ``options.rotary_dim`` channels of each head."""
    return RotaryEmbedding(
        options.head_size,
        options.rotary_dim,
        options.max_position,
        options.rope_parameters,
        is_neox_style=True,
        ctx=ctx,
    )


class LlamaMLP(torch.nn.Module):
    """Gated MLP ``down(act(gate(x)) * up(x))``; ``hidden_act`` overrides
    ``config.hidden_act`` (Gemma names it ``hidden_activation``)."""

    def __init__(self, config: Any, ctx: BuildContext, hidden_act: str | None = None) -> None:
        super().__init__()
        bias = bool(getattr(config, "mlp_bias", False))
        intermediate = config.intermediate_size
        self.gate_up_proj = Linear(config.hidden_size, (intermediate, intermediate), bias, ctx)
        self.down_proj = Linear(intermediate, (config.hidden_size,), bias, ctx)
        self.act_fn = GatedActivation(hidden_act or config.hidden_act, ctx)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(hidden)))


class LlamaDecoderLayer(torch.nn.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``, with the
    residual threaded through the fused add+norm ops. ``self_attn`` and ``mlp`` default
    to Llama's; any module with the same call signature fits."""

    def __init__(
        self,
        config: Any,
        ctx: BuildContext,
        self_attn: torch.nn.Module | None = None,
        mlp: torch.nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.self_attn = self_attn or LlamaAttention(config, ctx)
        self.mlp = mlp or LlamaMLP(config, ctx)
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
    """Embedding, decoder layers, final norm. ``make_layer(layer_index)`` builds each
    layer (default: a Llama layer)."""

    def __init__(
        self,
        config: Any,
        ctx: BuildContext,
        make_layer: Callable[[int], torch.nn.Module] | None = None,
    ) -> None:
        super().__init__()
        make_layer = make_layer or (lambda _: LlamaDecoderLayer(config, ctx))
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size, ctx)
        self.layers = torch.nn.ModuleList(make_layer(i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, ctx)

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, hidden_size]
        return self.embed_tokens(token_ids)

    def forward(
        self, token_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata
    ) -> torch.Tensor:  # [T, hidden_size]
        hidden = self.embed(token_ids)
        residual: torch.Tensor | None = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, metadata)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(CausalLM):
    """Llama decoder plus LM head (the model contract: :class:`~kvplane.models.base.CausalLM`)."""

    #: Checkpoint matrices stacked into one kvplane layer: (ours, theirs, shard index;
    #: None when the checkpoint tensor already holds every shard).
    stacked_params: Sequence[tuple[str, str, int | None]] = (
        ("qkv_proj", "q_proj", 0),
        ("qkv_proj", "k_proj", 1),
        ("qkv_proj", "v_proj", 2),
        ("gate_up_proj", "gate_proj", 0),
        ("gate_up_proj", "up_proj", 1),
    )
    #: Checkpoint tensors that carry nothing the model needs.
    ignored_suffixes: Sequence[str] = ("rotary_emb.inv_freq",)

    def __init__(self, config: Any, ctx: BuildContext) -> None:
        super().__init__()
        self.config = config
        # Layers with equal rotary settings share one cos/sin table (see make_rotary).
        self._rotary_tables: dict[str, torch.nn.Module] = {}
        self.model = LlamaModel(config, ctx, lambda i: self.make_layer(config, i, ctx))
        tied = self.model.embed_tokens if getattr(config, "tie_word_embeddings", False) else None
        self.lm_head = LMHead(config.vocab_size, config.hidden_size, ctx, tied_to=tied)

    # -- builders architectures override (called from __init__, once per layer) ---------

    def attention_options(self, config: Any, layer_index: int) -> AttentionOptions:
        return llama_attention_options(config)

    def make_rotary(
        self, config: Any, options: AttentionOptions, ctx: BuildContext
    ) -> torch.nn.Module:
        """The rotary layer for ``options``: one shared module per distinct setting."""
        key = repr(
            (
                options.head_size,
                options.rotary_dim,
                options.max_position,
                sorted(options.rope_parameters.items()),
            )
        )
        if key not in self._rotary_tables:
            self._rotary_tables[key] = default_rotary(options, ctx)
        return self._rotary_tables[key]

    def make_attention(self, config: Any, layer_index: int, ctx: BuildContext) -> torch.nn.Module:
        options = self.attention_options(config, layer_index)
        return LlamaAttention(config, ctx, options, self.make_rotary(config, options, ctx))

    def make_mlp(self, config: Any, layer_index: int, ctx: BuildContext) -> torch.nn.Module:
        return LlamaMLP(config, ctx)

    def layer_prefix(self, layer_index: int) -> str:
        """The checkpoint name of decoder layer ``layer_index``, for layers that name
        themselves in errors or match a checkpoint's ignore list."""
        return f"model.layers.{layer_index}"

    def make_layer(self, config: Any, layer_index: int, ctx: BuildContext) -> torch.nn.Module:
        return LlamaDecoderLayer(
            config,
            ctx,
            self.make_attention(config, layer_index, ctx),
            self.make_mlp(config, layer_index, ctx),
        )

    # -- the model contract (compute_logits and load_weights: CausalLM's) ----------------

    def forward(
        self, token_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata
    ) -> torch.Tensor:
        return self.model(token_ids, positions, metadata)
