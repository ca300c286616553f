"""The interface every quantization method implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    # Annotation only: importing kvplane.plugins here would be circular, since the
    # plugin package imports this module.
    from kvplane.plugins.types import LayerQuantSpec


class QuantMethod(ABC):
    """How one linear layer stores and multiplies its weight.

    Lifecycle, all driven by :class:`kvplane.models.layers.linear.Linear`:
    :meth:`create_weights` registers parameters on the layer before loading; the loader
    fills ``layer.weight`` (and ``layer.bias``) in the checkpoint's float format;
    :meth:`process_weights_after_loading` converts them once; :meth:`apply` runs per step.
    """

    #: Name users pass as ``quantization=...``.
    name: str = "unnamed"
    #: Higher wins when several methods of the same name can implement a layer.
    priority: int = 0

    @abstractmethod
    def can_implement(self, spec: LayerQuantSpec) -> tuple[bool, str]:
        """Return ``(True, "")`` or ``(False, why not)`` for this layer."""

    def create_weights(self, layer: torch.nn.Module, spec: LayerQuantSpec) -> None:
        """Register the float ``weight`` (and ``bias``) parameters the loader fills."""
        layer.weight = torch.nn.Parameter(
            torch.empty(spec.output_size, spec.input_size, dtype=spec.params_dtype),
            requires_grad=False,
        )
        if spec.has_bias:
            layer.bias = torch.nn.Parameter(
                torch.empty(spec.output_size, dtype=spec.params_dtype), requires_grad=False
            )
        else:
            layer.register_parameter("bias", None)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Convert loaded float weights to this method's format (default: keep them)."""
        return None

    @abstractmethod
    def apply(
        self,
        layer: torch.nn.Module,
        x: torch.Tensor,  # [num_tokens, input_size]
    ) -> torch.Tensor:  # [num_tokens, output_size]
        """Compute ``x @ W.T + bias`` with the stored weights."""
