"""What a model needs while it is being built: the platform, dtype and quantization."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvplane.plugins.platform import Platform
from kvplane.quantization.config import QuantConfig


@dataclass(frozen=True, slots=True)
class BuildContext:
    """Passed to every model and layer constructor.

    ``quantization`` is the method (and its checkpoint options) for linear layers
    (:func:`kvplane.quantization.config.resolve_quant_config`; default: float);
    ``block_size`` is the KV-cache block size the attention layers are specialised for;
    ``kv_cache_dtype`` what their caches store (None: ``dtype``; float8_e4m3fn: the FP8
    KV cache, see :mod:`kvplane.models.kv_scales`).
    """

    platform: Platform
    dtype: torch.dtype
    device: torch.device
    block_size: int
    quantization: QuantConfig = field(default_factory=QuantConfig)
    kv_cache_dtype: torch.dtype | None = None
