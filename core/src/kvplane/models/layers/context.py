"""What a model needs while it is being built: the platform, dtype and quantization."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvplane.plugins.platform import Platform


@dataclass(frozen=True, slots=True)
class BuildContext:
    """Passed to every model and layer constructor.

    ``quantization`` is the method name for linear layers ("none" for float);
    ``block_size`` is the KV-cache block size the attention layers are specialised for.
    """

    platform: Platform
    dtype: torch.dtype
    device: torch.device
    block_size: int
    quantization: str = "none"
