"""Quantized mixture-of-experts experts as the core holds and runs them: the default
expert hooks of :class:`~kvplane.quantization.base.QuantMethod` for methods that set
``experts_as_linear_layers``.

Storage: each expert's gate and up matrices are one stacked linear layer of the method
(``output_sizes (I, I)``, like a dense MLP's ``gate_up_proj``) in ``layer.w13_experts``,
its down matrix another in ``layer.w2_experts``
(:class:`~kvplane.quantization.linear.QuantizedLinear`), so every checkpoint layout the
method reads for a linear layer it reads for an expert, with the same checks: FP8
per-tensor scales of the gate and up matrices kept per row, a static ``input_scale``
per matrix, GPTQ act-order ``g_idx`` equal for gate and up (they read the same input).

Product: tokens grouped by expert (:func:`kvplane.ops.steps.sum_over_experts`), each
group through the method's own :meth:`~kvplane.quantization.base.QuantMethod.apply` on
the expert's gate/up layer, the gated activation, and ``apply`` on its down layer. A
platform whose subclass replaces a product (``scaled_matmul``, ``matmul``) runs its
kernel for every expert; per-token activation scales are computed from each expert's
rows, which are the same values as over the whole batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kvplane.ops.reference import gated_activation
from kvplane.ops.steps import sum_over_experts
from kvplane.quantization.linear import QuantizedLinear

if TYPE_CHECKING:
    # Annotations only: kvplane.plugins imports this package (circular at run time).
    from kvplane.plugins.types import ExpertQuantSpec
    from kvplane.quantization.base import QuantMethod

#: Each expert matrix's stacked layer (attribute of the MoE layer) and shard in it.
SHARDS: dict[str, tuple[str, int]] = {
    "gate": ("w13_experts", 0),
    "up": ("w13_experts", 1),
    "down": ("w2_experts", 0),
}


def can_implement_linear_experts(method: QuantMethod, spec: ExpertQuantSpec) -> tuple[bool, str]:
    """What ``method.can_implement`` says of one expert's gate/up and down matrices."""
    for what, matrix_spec in (("gate/up", spec.gate_up), ("down", spec.down)):
        ok, reason = method.can_implement(matrix_spec)
        if not ok:
            return False, f"expert {what} matrix: {reason}"
    return True, ""


def create_linear_experts(
    method: QuantMethod, layer: torch.nn.Module, spec: ExpertQuantSpec
) -> None:
    """Register ``w13_experts`` and ``w2_experts`` on ``layer``: one linear layer of
    ``method`` per expert and stacked matrix."""
    num_experts = spec.num_experts
    layer.w13_experts = torch.nn.ModuleList(
        QuantizedLinear(method, spec.gate_up) for _ in range(num_experts)
    )
    layer.w2_experts = torch.nn.ModuleList(
        QuantizedLinear(method, spec.down) for _ in range(num_experts)
    )


def expert_layer(layer: torch.nn.Module, expert: int, shard: str) -> tuple[QuantizedLinear, int]:
    """The linear layer holding ``expert``'s ``shard`` matrix, and the shard's index in it."""
    if shard not in SHARDS:
        raise ValueError(f"unknown expert shard {shard!r}; use one of {sorted(SHARDS)}")
    attribute, index = SHARDS[shard]
    stacked = getattr(layer, attribute)
    assert isinstance(stacked, torch.nn.ModuleList)
    linear = stacked[expert]
    assert isinstance(linear, QuantizedLinear)
    return linear, index


def linear_expert_param_names(layer: torch.nn.Module, shard: str) -> list[str]:
    """The checkpoint tensors each expert's ``shard`` matrix needs (its linear layer's)."""
    linear, _ = expert_layer(layer, 0, shard)
    return linear.quant_method.checkpoint_param_names(linear)


def load_linear_expert_tensor(
    layer: torch.nn.Module, name: str, loaded: torch.Tensor, expert: int, shard: str
) -> str:
    """Copy ``loaded`` into ``expert``'s linear layer for ``shard``, as a checkpoint shard
    of a stacked linear layer is copied."""
    linear, index = expert_layer(layer, expert, shard)
    return linear.load_shard(name, loaded, index)


def process_linear_experts(layer: torch.nn.Module) -> None:
    for attribute in ("w13_experts", "w2_experts"):
        for linear in getattr(layer, attribute):
            linear.process_weights_after_loading()


def apply_linear_experts(
    method: QuantMethod,
    layer: torch.nn.Module,
    hidden: torch.Tensor,  # [num_tokens, hidden_size]
    topk_weights: torch.Tensor,  # [num_tokens, top_k] float32
    topk_ids: torch.Tensor,  # [num_tokens, top_k] int64
    activation: str,
) -> torch.Tensor:  # [num_tokens, hidden_size]
    """The ``fused_moe`` sum with each expert's products by ``method.apply``."""
    w13_experts, w2_experts = layer.w13_experts, layer.w2_experts
    assert isinstance(w13_experts, torch.nn.ModuleList)
    assert isinstance(w2_experts, torch.nn.ModuleList)

    def expert_mlp(expert: int, rows: torch.Tensor) -> torch.Tensor:
        gate_up = method.apply(w13_experts[expert], rows)  # [count, 2 * I]
        return method.apply(w2_experts[expert], gated_activation(gate_up, activation))

    return sum_over_experts(hidden, topk_weights, topk_ids, len(w13_experts), expert_mlp)
