"""RMSNorm through the platform's ``rms_norm`` / ``fused_add_rms_norm`` ops."""

from __future__ import annotations

import torch

from kvplane.models.layers.context import BuildContext


class RMSNorm(torch.nn.Module):
    """RMS normalisation; with a residual, adds it first and returns the new residual."""

    def __init__(self, hidden_size: int, eps: float, ctx: BuildContext) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(
            torch.ones(hidden_size, dtype=ctx.dtype), requires_grad=False
        )
        self.eps = eps
        self._rms_norm = ctx.platform.ops.rms_norm
        self._fused_add_rms_norm = ctx.platform.ops.fused_add_rms_norm

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return self._rms_norm(x, self.weight, self.eps)
        return self._fused_add_rms_norm(x, residual, self.weight, self.eps)
