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
    ``block_size`` is the KV-cache block size the attention layers are specialised for.
    """

    platform: Platform
    dtype: torch.dtype
    device: torch.device
    block_size: int
    quantization: QuantConfig = field(default_factory=QuantConfig)
