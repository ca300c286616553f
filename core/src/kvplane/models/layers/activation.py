"""Gated activations through the platform's ``silu_and_mul`` / ``gelu_and_mul`` ops, and
plain element-wise ones (torch; no platform op)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

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


class Activation(torch.nn.Module):
    """Element-wise ``act(x)`` for non-gated MLPs (GPT-2), in float32 through torch;
    returns the input dtype. ``gelu_new`` is the tanh approximation."""

    def __init__(self, hidden_act: str, ctx: BuildContext) -> None:
        super().__init__()
        if hidden_act not in _GELU_APPROXIMATIONS and hidden_act not in ("silu", "relu"):
            supported = sorted({*_GELU_APPROXIMATIONS, "silu", "relu"})
            raise ValueError(f"unsupported activation {hidden_act!r}; supported: {supported}")
        self.hidden_act = hidden_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, I] -> [T, I]
        x_f32 = x.float()
        if self.hidden_act == "silu":
            out = F.silu(x_f32)
        elif self.hidden_act == "relu":
            out = F.relu(x_f32)
        else:
            out = F.gelu(x_f32, approximate=_GELU_APPROXIMATIONS[self.hidden_act])
        return out.to(x.dtype)
