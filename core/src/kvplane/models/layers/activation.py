"""Gated activations through the platform's ``silu_and_mul`` / ``gelu_and_mul`` ops."""

from __future__ import annotations

import torch

from kvplane.models.layers.context import BuildContext

_GELU_APPROXIMATIONS = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}


class GatedActivation(torch.nn.Module):
    """``act(x[..., :I]) * x[..., I:]`` for the checkpoint's ``hidden_act``."""

    def __init__(self, hidden_act: str, ctx: BuildContext) -> None:
        super().__init__()
        if hidden_act == "silu":
            self._op = ctx.platform.ops.silu_and_mul
            self._approximate: str | None = None
        elif hidden_act in _GELU_APPROXIMATIONS:
            self._op = ctx.platform.ops.gelu_and_mul
            self._approximate = _GELU_APPROXIMATIONS[hidden_act]
        else:
            raise ValueError(f"unsupported gated activation {hidden_act!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, 2*I] -> [T, I]
        if self._approximate is None:
            return self._op(x)
        return self._op(x, self._approximate)
