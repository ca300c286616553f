"""The interface every quantization method implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch

from kvplane.quantization.params import ShardLayout, register_param

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

    Parameters are registered with :func:`~kvplane.quantization.params.register_param`,
    which records where each output shard of a stacked layer lies in them; every
    parameter registered before loading must be filled by the checkpoint.
    """

    #: Name users pass as ``quantization=...``.
    name: str = "unnamed"
    #: Higher wins when several methods of the same name can implement a layer.
    priority: int = 0
    #: Set on the instances the core's reference plugin offers, so choosing one on a
    #: platform that has no implementation of its own is logged.
    is_reference_fallback: bool = False

    @abstractmethod
    def can_implement(self, spec: LayerQuantSpec) -> tuple[bool, str]:
        """Return ``(True, "")`` or ``(False, why not)`` for this layer."""

    def create_weights(self, layer: torch.nn.Module, spec: LayerQuantSpec) -> None:
        """Register the float ``weight`` (and ``bias``) parameters the loader fills."""
        weight = torch.empty(spec.output_size, spec.input_size, dtype=spec.params_dtype)
        register_param(layer, "weight", weight)
        register_bias(layer, spec)

    def load_checkpoint_tensor(
        self, layer: torch.nn.Module, name: str, loaded: torch.Tensor, shard_index: int
    ) -> str | None:
        """Take checkpoint tensor ``name`` of shard ``shard_index`` in a form only this
        method knows (GGUF's raw blocks, say) and return the parameter name it fills;
        None (the default) lets the layer copy it into the registered parameter."""
        return None

    def checkpoint_param_names(self, layer: torch.nn.Module) -> list[str]:
        """The parameter names every shard's checkpoint tensors must fill (default: the
        parameters registered with :func:`register_param`)."""
        layouts = getattr(layer, "shard_layouts", {})
        return [name for name in layouts if getattr(layer, name, None) is not None]

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


def register_bias(layer: torch.nn.Module, spec: LayerQuantSpec) -> None:
    """Register the float ``bias`` when ``spec`` has one, else a None ``bias``."""
    if spec.has_bias:
        bias = torch.empty(spec.output_size, dtype=spec.params_dtype)
        register_param(layer, "bias", bias, ShardLayout(output_dim=0))
    else:
        layer.register_parameter("bias", None)
