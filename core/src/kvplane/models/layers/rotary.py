"""Rotary position embedding: the cos/sin table (with rope scaling) and the op call."""

from __future__ import annotations

import math
from typing import Any

import torch

from kvplane.models.layers.context import BuildContext


def rope_parameters(hf_config: Any) -> dict[str, Any]:
    """Rope settings from a transformers config, old (``rope_theta`` + ``rope_scaling``)
    or new (``rope_parameters``) style, as one dict with at least ``rope_type`` and
    ``rope_theta``."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    scaling = getattr(hf_config, "rope_scaling", None) or {}
    merged = {**scaling, **params}
    merged.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    merged["rope_type"] = merged.get("rope_type", merged.get("type", "default"))
    return merged


def inverse_frequencies(
    rotary_dim: int, params: dict[str, Any], max_position_embeddings: int
) -> tuple[torch.Tensor, float]:  # ([rotary_dim // 2] float32, attention scaling)
    """Per-channel-pair rotation frequencies for ``params["rope_type"]``."""
    base = float(params["rope_theta"])
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    inv_freq = 1.0 / (base**exponents)
    rope_type = params["rope_type"]
    if rope_type in ("default", "dynamic"):
        # Dynamic NTK equals the default table up to the original context length.
        return inv_freq, 1.0
    if rope_type == "linear":
        return inv_freq / float(params["factor"]), 1.0
    if rope_type == "llama3":
        return _llama3_frequencies(inv_freq, params), 1.0
    if rope_type == "yarn":
        return _yarn_frequencies(rotary_dim, base, params, max_position_embeddings)
    raise ValueError(
        f"unsupported rope_type {rope_type!r}; supported: default, linear, dynamic, llama3, yarn"
    )


def _llama3_frequencies(inv_freq: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
    factor = float(params["factor"])
    low_freq_factor = float(params["low_freq_factor"])
    high_freq_factor = float(params["high_freq_factor"])
    old_context_len = float(params["original_max_position_embeddings"])
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_frequencies(
    rotary_dim: int, base: float, params: dict[str, Any], max_position_embeddings: int
) -> tuple[torch.Tensor, float]:
    factor = float(params["factor"])
    original_max = int(params.get("original_max_position_embeddings") or max_position_embeddings)
    beta_fast = float(params.get("beta_fast") or 32)
    beta_slow = float(params.get("beta_slow") or 1)

    def mscale(scale: float, coefficient: float = 1.0) -> float:
        return 0.1 * coefficient * math.log(scale) + 1.0 if scale > 1 else 1.0

    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        if params.get("mscale") and params.get("mscale_all_dim"):
            attention_factor = mscale(factor, params["mscale"]) / mscale(
                factor, params["mscale_all_dim"]
            )
        else:
            attention_factor = mscale(factor)

    def correction_dim(num_rotations: float) -> float:
        return (rotary_dim * math.log(original_max / (num_rotations * 2 * math.pi))) / (
            2 * math.log(base)
        )

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high: float = min(math.ceil(correction_dim(beta_slow)), rotary_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(rotary_dim // 2).float() - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    extrapolation_weight = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight
    return inv_freq, float(attention_factor)


class RotaryEmbedding(torch.nn.Module):
    """Applies rotary embedding to query and key through the platform's op.

    The cos/sin table covers ``max_position`` positions and is built once, in float32.
    """

    def __init__(
        self,
        head_size: int,
        rotary_dim: int,
        max_position: int,
        params: dict[str, Any],
        is_neox_style: bool,
        ctx: BuildContext,
    ) -> None:
        super().__init__()
        inv_freq, attention_scaling = inverse_frequencies(rotary_dim, params, max_position)
        positions = torch.arange(max_position, dtype=torch.float32)
        angles = torch.outer(positions, inv_freq)  # [max_position, rotary_dim // 2]
        cos_sin = torch.cat((angles.cos(), angles.sin()), dim=-1) * attention_scaling
        self.register_buffer("cos_sin_cache", cos_sin.to(ctx.device), persistent=False)
        self.head_size = head_size
        self.is_neox_style = is_neox_style
        self._rotary_embedding = ctx.platform.ops.rotary_embedding

    def forward(
        self,
        positions: torch.Tensor,  # [num_tokens]
        query: torch.Tensor,  # [num_tokens, num_heads, head_size]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._rotary_embedding(positions, query, key, self.cos_sin_cache, self.is_neox_style)
