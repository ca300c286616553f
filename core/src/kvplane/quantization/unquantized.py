"""The unquantized float linear layer, available on every platform."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from kvplane.quantization.base import QuantMethod

if TYPE_CHECKING:
    # Annotation only: importing kvplane.plugins here would be circular, since the
    # plugin package imports this module.
    from kvplane.plugins.types import ExpertQuantSpec, LayerQuantSpec


class UnquantizedMethod(QuantMethod):
    """``F.linear`` on the float weights as loaded."""

    name = "none"
    priority = -1000

    def can_implement(self, spec: LayerQuantSpec) -> tuple[bool, str]:
        return True, ""

    def can_implement_experts(self, spec: ExpertQuantSpec) -> tuple[bool, str]:
        return False, "float experts run through the platform's fused_moe op"

    def apply(self, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        weight, bias = layer.weight, layer.bias
        # torch types module attributes as Tensor | Module; create_weights made these.
        assert isinstance(weight, torch.Tensor) and (bias is None or isinstance(bias, torch.Tensor))
        return F.linear(x, weight, bias)
