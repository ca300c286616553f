"""FP8 KV-cache scales in checkpoints: the names quantization tools write them under,
mapped onto the model's attention layers.

A checkpoint calibrated for an FP8 KV cache carries one float32 scalar per layer for
the keys and one for the values (the cache holds ``key / k_scale``):

- llm-compressor / compressed-tensors (``kv_cache_scheme``):
  ``model.layers.N.self_attn.k_scale`` and ``.v_scale``;
- NVIDIA ModelOpt: ``model.layers.N.self_attn.k_proj.k_scale`` and ``v_proj.v_scale``;
- older compressed-tensors exports and AMD Quark: ``...self_attn.k_proj.output_scale``
  and ``v_proj.output_scale``;
- AutoFP8 (deprecated): one ``...self_attn.kv_scale`` for both.

The query and attention-probability scales some of them add (``q_scale``,
``q_proj.output_scale``, ``prob_scale``) only matter to attention computed in FP8;
kvplane attends in float32 (or the model dtype on tensor cores), so they are skipped.
Scales of a checkpoint loaded with ``kv_cache_dtype="auto"`` are unused (logged).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvplane.models.layers.attention import Attention

#: Checkpoint suffix -> which scales it sets.
_KV_SCALE_SUFFIXES: dict[str, tuple[str, ...]] = {
    ".k_proj.k_scale": ("k",),
    ".v_proj.v_scale": ("v",),
    ".k_proj.output_scale": ("k",),
    ".v_proj.output_scale": ("v",),
    ".k_scale": ("k",),
    ".v_scale": ("v",),
    ".kv_scale": ("k", "v"),
}
#: Scales of FP8 attention arithmetic, which kvplane does not use.
_UNUSED_SUFFIXES = (".q_scale", ".q_proj.output_scale", ".prob_scale")


@dataclass(frozen=True, slots=True)
class KVScaleName:
    """A checkpoint tensor holding KV-cache scales: the module the attention layer sits
    in (``model.layers.3.self_attn``) and which scales it sets (``("k",)``, ...)."""

    parent: str
    which: tuple[str, ...]


def match_kv_scale(name: str) -> KVScaleName | None:
    """The KV-cache scale ``name`` holds, or ``None`` when it holds none."""
    for suffix, which in _KV_SCALE_SUFFIXES.items():
        if name.endswith(suffix):
            return KVScaleName(name[: -len(suffix)], which)
    return None


def is_unused_attention_scale(name: str) -> bool:
    """Whether ``name`` is a query or probability scale (FP8 attention only)."""
    return name.endswith(_UNUSED_SUFFIXES)


def load_kv_scale(
    modules: dict[str, torch.nn.Module], name: str, target: KVScaleName, tensor: torch.Tensor
) -> None:
    """Give the attention layer under ``target.parent`` the scale(s) in ``tensor``.

    Raises ``ValueError`` (naming the tensor) when no single attention layer sits under
    that module, or the tensor is not one positive finite number (kvplane reads
    per-tensor scales only).
    """
    parent = modules.get(target.parent)
    layers = [] if parent is None else [m for m in parent.modules() if isinstance(m, Attention)]
    if len(layers) != 1:
        raise ValueError(
            f"checkpoint tensor {name}: expected one attention layer under "
            f"{target.parent!r}, found {len(layers)}"
        )
    if tensor.numel() != 1:
        raise ValueError(
            f"checkpoint tensor {name}: KV-cache scales must be per-tensor (one value), "
            f"got shape {tuple(tensor.shape)}"
        )
    scale = float(tensor.float().item())
    if not (math.isfinite(scale) and scale > 0.0):
        raise ValueError(f"checkpoint tensor {name}: KV-cache scale {scale} is not positive")
    for which in target.which:
        layers[0].set_kv_scale(which, scale)


def describe_kv_scales(model: torch.nn.Module) -> str | None:
    """One log line on the KV-cache scales after loading, or ``None`` when there is
    nothing to say (a float cache and a checkpoint without scales)."""
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    with_scales = sum(1 for layer in layers if layer.checkpoint_kv_scales)
    quantized = any(layer.impl.quantizes_kv_cache for layer in layers)
    if not quantized:
        if with_scales == 0:
            return None
        return (
            f"the checkpoint's KV-cache scales (for {with_scales} of {len(layers)} attention "
            "layers) are unused: the KV cache is not FP8 (kv_cache_dtype='fp8' stores it in "
            "FP8 with them)"
        )
    if with_scales == 0:
        return "FP8 KV cache: the checkpoint has no k_scale / v_scale; every scale is 1.0"
    return (
        f"FP8 KV cache: the checkpoint's k_scale / v_scale for {with_scales} of "
        f"{len(layers)} attention layers (1.0 for the rest)"
    )
