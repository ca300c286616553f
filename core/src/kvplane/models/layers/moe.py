"""Mixture-of-experts MLP: a softmax top-k router and stacked experts run by the
platform's ``fused_moe`` op, plus the loader that stacks per-expert checkpoint tensors."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from kvplane.models.layers.context import BuildContext
from kvplane.models.layers.linear import Linear
from kvplane.models.weights import WeightLoadError
from kvplane.ops import reference as reference_ops

#: ``hidden_act`` of a checkpoint -> ``activation`` of the ``fused_moe`` op.
_ACTIVATIONS = {
    "silu": "silu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
}


def select_experts(
    router_logits: torch.Tensor,  # [num_tokens, num_experts]
    top_k: int,
    renormalize: bool,
) -> tuple[torch.Tensor, torch.Tensor]:  # ([num_tokens, top_k] float32, [..] int64)
    """Softmax over all experts in float32, keep the ``top_k`` most probable (ties broken
    as ``torch.topk`` breaks them, like transformers) and, with ``renormalize``, rescale
    the kept probabilities to sum to one (Mixtral; Qwen-MoE's ``norm_topk_prob``)."""
    probs = router_logits.float().softmax(dim=-1)
    topk_weights, topk_ids = probs.topk(top_k, dim=-1)
    if renormalize:
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    return topk_weights, topk_ids


class FusedMoE(torch.nn.Module):
    """``sum_j p_j * expert_{e_j}(x)`` over the ``top_k`` experts the router picks.

    ``gate`` is the router (``[num_experts, hidden_size]``, never quantized: routing is
    sensitive and the matrix tiny). The experts live stacked as ``w13``
    ``[num_experts, 2 * intermediate_size, hidden_size]`` (each expert's gate rows, then
    its up rows) and ``w2`` ``[num_experts, hidden_size, intermediate_size]``, in the model
    dtype whatever ``ctx.quantization`` says; :class:`ExpertWeightLoader` fills them.
    """

    def __init__(
        self,
        num_experts: int,
        top_k: int,
        hidden_size: int,
        intermediate_size: int,
        hidden_act: str,
        renormalize: bool,
        ctx: BuildContext,
    ) -> None:
        super().__init__()
        if hidden_act not in _ACTIVATIONS:
            raise ValueError(
                f"unsupported mixture-of-experts activation {hidden_act!r}; "
                f"supported: {', '.join(sorted(_ACTIVATIONS))}"
            )
        if not 0 < top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.intermediate_size = intermediate_size
        self.renormalize = renormalize
        self.activation = _ACTIVATIONS[hidden_act]
        self.gate = Linear(hidden_size, (num_experts,), False, ctx, quantize=False)
        self.w13 = torch.nn.Parameter(
            torch.empty(num_experts, 2 * intermediate_size, hidden_size, dtype=ctx.dtype),
            requires_grad=False,
        )
        self.w2 = torch.nn.Parameter(
            torch.empty(num_experts, hidden_size, intermediate_size, dtype=ctx.dtype),
            requires_grad=False,
        )
        self._fused_moe = ctx.platform.ops.fused_moe
        # The reference reads the per-expert counts on the host (a device sync), which a
        # captured graph cannot do: with it, decode steps run eagerly.
        self.supports_graph_capture = self._fused_moe is not reference_ops.fused_moe

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [T, hidden] -> [T, hidden]
        router_logits = self.gate(hidden)  # [T, num_experts]
        topk_weights, topk_ids = select_experts(router_logits, self.top_k, self.renormalize)
        return self._fused_moe(hidden, self.w13, self.w2, topk_weights, topk_ids, self.activation)

    def expert_matrix(self, shard: str, expert: int) -> torch.Tensor:
        """The rows of ``w13`` / ``w2`` that hold ``shard`` ("gate", "up" or "down") of
        ``expert``: a view to copy a checkpoint tensor into."""
        if not 0 <= expert < self.num_experts:
            raise WeightLoadError(f"expert {expert} out of range: the layer has {self.num_experts}")
        size = self.intermediate_size
        if shard == "gate":
            return self.w13.data[expert, :size]
        if shard == "up":
            return self.w13.data[expert, size:]
        if shard == "down":
            return self.w2.data[expert]
        raise ValueError(f"unknown expert shard {shard!r}; use 'gate', 'up' or 'down'")


@dataclass(frozen=True, slots=True)
class ExpertNames:
    """Checkpoint names of an expert's three matrices, as in
    ``{layer}.experts.{e}.{gate}.weight`` (Mixtral: w1, w3, w2; Qwen-MoE: gate_proj,
    up_proj, down_proj)."""

    gate: str
    up: str
    down: str


MIXTRAL_EXPERT_NAMES = ExpertNames(gate="w1", up="w3", down="w2")
QWEN_EXPERT_NAMES = ExpertNames(gate="gate_proj", up="up_proj", down="down_proj")


class ExpertWeightLoader:
    """Stacks per-expert checkpoint tensors into the :class:`FusedMoE` layers of a model.

    Use it around :func:`kvplane.models.weights.load_named_weights`::

        experts = ExpertWeightLoader(model, MIXTRAL_EXPERT_NAMES)
        loaded = load_named_weights(model, experts.intercept(weights), ...)
        return loaded | experts.loaded_names()

    :meth:`intercept` copies ``{moe}.experts.{e}.{name}.weight`` into the layer at
    ``{moe}`` and passes every other tensor on; :meth:`loaded_names` then lists ``w13`` /
    ``w2`` of each layer whose experts all arrived, so the loader's completeness check
    names a layer that lacks any.
    """

    def __init__(self, model: torch.nn.Module, names: ExpertNames) -> None:
        self._layers = {
            name: module for name, module in model.named_modules() if isinstance(module, FusedMoE)
        }
        self._shards = {names.gate: "gate", names.up: "up", names.down: "down"}
        alternatives = "|".join(re.escape(name) for name in self._shards)
        self._pattern = re.compile(rf"^(.+)\.experts\.(\d+)\.({alternatives})\.weight$")
        self._filled: dict[str, set[tuple[str, int]]] = {name: set() for name in self._layers}

    def intercept(
        self, weights: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Load expert tensors as they stream past; yield all the others unchanged."""
        for name, tensor in weights:
            match = self._pattern.match(name)
            if match is None or match.group(1) not in self._layers:
                yield name, tensor
                continue
            layer_name, expert, shard = match.group(1), int(match.group(2)), match.group(3)
            target = self._layers[layer_name].expert_matrix(self._shards[shard], expert)
            if target.shape != tensor.shape:
                raise WeightLoadError(
                    f"shape mismatch for {name}: checkpoint {tuple(tensor.shape)}, "
                    f"model {tuple(target.shape)}"
                )
            target.copy_(tensor)
            self._filled[layer_name].add((self._shards[shard], expert))

    def loaded_names(self) -> set[str]:
        """``{layer}.w13`` / ``{layer}.w2`` for every layer all of whose experts loaded."""
        loaded: set[str] = set()
        for layer_name, layer in self._layers.items():
            filled = self._filled[layer_name]
            experts = range(layer.num_experts)
            if all(("gate", e) in filled and ("up", e) in filled for e in experts):
                loaded.add(f"{layer_name}.w13")
            if all(("down", e) in filled for e in experts):
                loaded.add(f"{layer_name}.w2")
        return loaded
