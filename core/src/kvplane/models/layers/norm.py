"""RMSNorm through the platform's ``rms_norm`` / ``fused_add_rms_norm`` ops, and a plain
LayerNorm (torch's ``layer_norm``; no platform op)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

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


class LayerNorm(torch.nn.Module):
    """``(x - mean) / sqrt(var + eps) * weight + bias`` over the last dim (GPT-2), in
    float32 through torch's ``layer_norm``; returns the input dtype. No residual fusion:
    callers add residuals themselves."""

    def __init__(self, hidden_size: int, eps: float, ctx: BuildContext, bias: bool = True) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(
            torch.ones(hidden_size, dtype=ctx.dtype), requires_grad=False
        )
        self.bias = (
            torch.nn.Parameter(torch.zeros(hidden_size, dtype=ctx.dtype), requires_grad=False)
            if bias
            else None
        )
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, hidden] -> [T, hidden]
        bias = None if self.bias is None else self.bias.float()
        normed = F.layer_norm(x.float(), (x.shape[-1],), self.weight.float(), bias, self.eps)
        return normed.to(x.dtype)
