"""The interface every quantization method implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch

from kvplane.quantization import experts
from kvplane.quantization.params import ShardLayout, register_param

if TYPE_CHECKING:
    # Annotation only: importing kvplane.plugins here would be circular, since the
    # plugin package imports this module.
    from kvplane.plugins.types import ExpertQuantSpec, LayerQuantSpec


class QuantMethod(ABC):
    """How one linear layer stores and multiplies its weight.

    Lifecycle, all driven by :class:`kvplane.quantization.linear.QuantizedLinear` (the
    models' :class:`~kvplane.models.layers.linear.Linear`, and each quantized expert):
    :meth:`create_weights` registers parameters on the layer before loading; the loader
    fills ``layer.weight`` (and ``layer.bias``) in the checkpoint's float format;
    :meth:`process_weights_after_loading` converts them once; :meth:`apply` runs per step.

    Parameters are registered with :func:`~kvplane.quantization.params.register_param`,
    which records where each output shard of a stacked layer lies in them; every
    parameter registered before loading must be filled by the checkpoint.

    Mixture-of-experts layers (:class:`kvplane.models.layers.moe.FusedMoE`, since plugin
    API 1.6) ask the method for their experts through the ``*_experts`` hooks below, in
    the same order: :meth:`create_expert_weights`, :meth:`load_expert_tensor` per
    checkpoint tensor, :meth:`process_expert_weights_after_loading`, then
    :meth:`apply_experts` per step. A method that sets :attr:`experts_as_linear_layers`
    gets the core's implementation of all of them
    (:mod:`kvplane.quantization.experts`: each expert's matrices are linear layers of
    this method, multiplied by its own :meth:`apply`, so a subclass that replaces a
    product gets it for experts too); a method with a fused expert kernel overrides them.
    """

    #: Name users pass as ``quantization=...``.
    name: str = "unnamed"
    #: Higher wins when several methods of the same name can implement a layer.
    priority: int = 0
    #: Set on the instances the core's reference plugin offers, so choosing one on a
    #: platform that has no implementation of its own is logged.
    is_reference_fallback: bool = False
    #: Experts through the core's implementation: each expert's gate/up and down matrices
    #: are linear layers of this method (False: :meth:`can_implement_experts` refuses
    #: unless overridden).
    experts_as_linear_layers: bool = False
    #: Whether :meth:`apply_experts` may run inside a captured graph (the core's reads
    #: the per-expert token counts on the host, so it cannot).
    experts_support_graph_capture: bool = False

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

    # -- mixture-of-experts layers (since plugin API 1.6) ---------------------------------

    def can_implement_experts(self, spec: ExpertQuantSpec) -> tuple[bool, str]:
        """Return ``(True, "")`` or ``(False, why not)`` for the experts of ``spec``.
        Default: with :attr:`experts_as_linear_layers`, what :meth:`can_implement` says
        of one expert's gate/up and down matrices; otherwise a refusal."""
        if not self.experts_as_linear_layers:
            return False, f"{self.name!r} has no mixture-of-experts implementation"
        return experts.can_implement_linear_experts(self, spec)

    def create_expert_weights(self, layer: torch.nn.Module, spec: ExpertQuantSpec) -> None:
        """Register the experts' parameters on ``layer`` before loading (default: one
        gate/up and one down linear layer of this method per expert)."""
        experts.create_linear_experts(self, layer, spec)

    def expert_checkpoint_param_names(self, layer: torch.nn.Module, shard: str) -> list[str]:
        """The checkpoint tensors (``weight``, ``weight_scale``, ``qweight``, ...) every
        expert's ``shard`` ("gate", "up" or "down") must provide."""
        return experts.linear_expert_param_names(layer, shard)

    def load_expert_tensor(
        self, layer: torch.nn.Module, name: str, loaded: torch.Tensor, expert: int, shard: str
    ) -> str:
        """Copy checkpoint tensor ``name`` of ``expert``'s ``shard`` matrix into the
        experts' storage and return the name filled (one of
        :meth:`expert_checkpoint_param_names`). Raises ValueError naming the tensor when
        it does not fit (shape, number format, a tensor this method does not read)."""
        return experts.load_linear_expert_tensor(layer, name, loaded, expert, shard)

    def process_expert_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Convert the loaded experts once (default: each expert's linear layers)."""
        experts.process_linear_experts(layer)

    def apply_experts(
        self,
        layer: torch.nn.Module,
        hidden: torch.Tensor,  # [num_tokens, hidden_size]
        topk_weights: torch.Tensor,  # [num_tokens, top_k] float32
        topk_ids: torch.Tensor,  # [num_tokens, top_k] int64
        activation: str,
    ) -> torch.Tensor:  # [num_tokens, hidden_size]
        """What the ``fused_moe`` op computes (:func:`kvplane.ops.reference.fused_moe`)
        with the stored experts. Default: tokens grouped by expert, each group through
        this method's :meth:`apply` on the expert's gate/up matrix, the gated activation,
        and :meth:`apply` on its down matrix."""
        return experts.apply_linear_experts(self, layer, hidden, topk_weights, topk_ids, activation)


def register_bias(layer: torch.nn.Module, spec: LayerQuantSpec) -> None:
    """Register the float ``bias`` when ``spec`` has one, else a None ``bias``."""
    if spec.has_bias:
        bias = torch.empty(spec.output_size, dtype=spec.params_dtype)
        register_param(layer, "bias", bias, ShardLayout(output_dim=0))
    else:
        layer.register_parameter("bias", None)
