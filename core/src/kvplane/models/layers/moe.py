"""Mixture-of-experts MLP: a softmax top-k router and experts run by the platform's
``fused_moe`` op (float) or by the quantization method (quantized), plus the loader that
routes per-expert checkpoint tensors into them."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from kvplane.models.layers.context import BuildContext
from kvplane.models.layers.linear import Linear
from kvplane.models.weights import WeightLoadError
from kvplane.ops import reference as reference_ops
from kvplane.plugins.types import ExpertQuantSpec
from kvplane.quantization.base import QuantMethod
from kvplane.quantization.config import is_ignored

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
#: The experts' matrices, in the order of :class:`ExpertNames`.
EXPERT_SHARDS = ("gate", "up", "down")


class FusedMoE(torch.nn.Module):
    """``sum_j p_j * expert_{e_j}(x)`` over the ``top_k`` experts the router picks.

    ``gate`` is the router (``[num_experts, hidden_size]``, never quantized: routing is
    sensitive and the matrix tiny). Float experts live stacked as ``w13``
    ``[num_experts, 2 * intermediate_size, hidden_size]`` (each expert's gate rows, then
    its up rows) and ``w2`` ``[num_experts, hidden_size, intermediate_size]`` and run
    through the platform's ``fused_moe`` op. With ``ctx.quantization`` the experts belong
    to the quantization method the platform picks for them (``quant_method``): it
    registers their parameters, takes their checkpoint tensors, converts them after
    loading and runs them (the ``*_experts`` hooks of
    :class:`~kvplane.quantization.base.QuantMethod`); unless the checkpoint's ignore list
    leaves them in float.

    ``prefix`` is the layer's checkpoint name (``model.layers.3.block_sparse_moe``) and
    ``expert_names`` its experts' matrix names: errors name the layer, and the
    checkpoint's ignore list is matched against ``{prefix}.experts.{e}.{name}``.
    :class:`ExpertWeightLoader` fills the experts.
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
        *,
        prefix: str = "",
        expert_names: ExpertNames | None = None,
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
        self.prefix = prefix
        self.gate = Linear(hidden_size, (num_experts,), False, ctx, quantize=False)
        spec = ExpertQuantSpec(
            ctx.quantization.method,
            num_experts,
            hidden_size,
            intermediate_size,
            ctx.dtype,
            ctx.quantization.options,
        )
        self.quant_method = self._expert_method(ctx, spec, expert_names)
        if self.quant_method is not None:
            self.quant_method.create_expert_weights(self, spec)
            self.supports_graph_capture = self.quant_method.experts_support_graph_capture
            return
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

    def _expert_method(
        self, ctx: BuildContext, spec: ExpertQuantSpec, names: ExpertNames | None
    ) -> QuantMethod | None:
        """The quantization method the platform picks for the experts; None for float
        experts. Raises ValueError naming the layer when no method can hold them."""
        if spec.method == "none" or self._experts_ignored(ctx.quantization.ignored_layers, names):
            return None
        try:
            return ctx.platform.expert_quant_method(spec)
        except ValueError as error:
            raise ValueError(f"{self._name}: {error}") from None

    @property
    def _name(self) -> str:
        return self.prefix or "mixture-of-experts layer"

    def _experts_ignored(self, patterns: tuple[str, ...], names: ExpertNames | None) -> bool:
        """Whether the checkpoint's ignore list leaves the experts in float: the layer or
        every expert matrix matches it. Some matrices but not all is an error (a
        layer's experts are quantized together, as in vLLM)."""
        if not patterns:
            return False
        experts = f"{self.prefix}.experts" if self.prefix else "experts"
        if any(is_ignored(name, patterns) for name in (self.prefix, experts) if name):
            return True
        matrices = [f"{experts}.{expert}" for expert in range(self.num_experts)]
        if names is not None:
            suffixes = (names.gate, names.up, names.down)
            matrices = [f"{name}.{suffix}" for name in matrices for suffix in suffixes]
        ignored = [name for name in matrices if is_ignored(name, patterns)]
        if len(ignored) in (0, len(matrices)):
            return bool(ignored)
        kept = next(name for name in matrices if name not in ignored)
        raise ValueError(
            f"{self._name}: the checkpoint's ignore list leaves {ignored[0]} in float but "
            f"not {kept}; all experts of a layer are quantized, or none"
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [T, hidden] -> [T, hidden]
        router_logits = self.gate(hidden)  # [T, num_experts]
        topk_weights, topk_ids = select_experts(router_logits, self.top_k, self.renormalize)
        if self.quant_method is not None:
            return self.quant_method.apply_experts(
                self, hidden, topk_weights, topk_ids, self.activation
            )
        return self._fused_moe(hidden, self.w13, self.w2, topk_weights, topk_ids, self.activation)

    def expert_matrix(self, shard: str, expert: int) -> torch.Tensor:
        """The rows of the float ``w13`` / ``w2`` that hold ``shard`` ("gate", "up" or
        "down") of ``expert``: a view to copy a checkpoint tensor into."""
        if self.quant_method is not None:
            raise ValueError(f"{self._name}: quantized experts have no float w13 / w2")
        self._check_expert(expert)
        size = self.intermediate_size
        if shard == "gate":
            return self.w13.data[expert, :size]
        if shard == "up":
            return self.w13.data[expert, size:]
        if shard == "down":
            return self.w2.data[expert]
        raise ValueError(f"unknown expert shard {shard!r}; use 'gate', 'up' or 'down'")

    def _check_expert(self, expert: int) -> None:
        if not 0 <= expert < self.num_experts:
            raise WeightLoadError(f"expert {expert} out of range: the layer has {self.num_experts}")

    def expert_tensor_names(self, shard: str) -> list[str]:
        """The checkpoint tensors every expert's ``shard`` matrix needs."""
        if self.quant_method is None:
            return ["weight"]
        return self.quant_method.expert_checkpoint_param_names(self, shard)

    def load_expert_tensor(self, name: str, loaded: torch.Tensor, expert: int, shard: str) -> str:
        """Copy checkpoint tensor ``name`` (``weight``, ``weight_scale``, ...) of
        ``expert``'s ``shard`` matrix into the experts; return the name filled. Raises
        ValueError when it does not fit."""
        self._check_expert(expert)
        if self.quant_method is not None:
            return self.quant_method.load_expert_tensor(self, name, loaded, expert, shard)
        if name != "weight":
            raise ValueError(f"checkpoint has a {name}, which float experts do not use")
        target = self.expert_matrix(shard, expert)
        if target.shape != loaded.shape:
            raise ValueError(
                f"shape mismatch: checkpoint {tuple(loaded.shape)}, model {tuple(target.shape)}"
            )
        target.copy_(loaded)
        return name

    def expert_param_names(self) -> list[str]:
        """This layer's parameters that hold the experts (all but the router's)."""
        return [name for name, _ in self.named_parameters() if not name.startswith("gate.")]

    def process_weights_after_loading(self) -> None:
        """Let the quantization method convert the loaded experts (float ones stay)."""
        if self.quant_method is not None:
            self.quant_method.process_expert_weights_after_loading(self)


class ExpertWeightLoader:
    """Routes per-expert checkpoint tensors into the :class:`FusedMoE` layers of a model.

    Use it around :func:`kvplane.models.weights.load_named_weights`::

        experts = ExpertWeightLoader(model, MIXTRAL_EXPERT_NAMES)
        loaded = load_named_weights(model, experts.intercept(weights), ...)
        return loaded | experts.loaded_names()

    :meth:`intercept` loads ``{moe}.experts.{e}.{matrix}.{tensor}`` (``weight``, and for
    quantized experts ``weight_scale``, ``input_scale``, ``qweight``, ...) into the layer
    whose checkpoint name (``prefix``, else its module name) is ``{moe}`` and passes every
    other tensor on; :meth:`loaded_names` then checks that
    every expert of every layer got each tensor it needs and lists the layers' expert
    parameters for the loader's completeness check.
    """

    def __init__(self, model: torch.nn.Module, names: ExpertNames) -> None:
        # Keyed by checkpoint name (the layer's prefix; its module name without one).
        self._layers = {
            module.prefix or name: module
            for name, module in model.named_modules()
            if isinstance(module, FusedMoE)
        }
        self._module_names = {
            module.prefix or name: name
            for name, module in model.named_modules()
            if isinstance(module, FusedMoE)
        }
        self._shards = {names.gate: "gate", names.up: "up", names.down: "down"}
        self._names = {shard: name for name, shard in self._shards.items()}
        alternatives = "|".join(re.escape(name) for name in self._shards)
        self._pattern = re.compile(rf"^(.+)\.experts\.(\d+)\.({alternatives})\.(\w+)$")
        self._filled: dict[str, set[tuple[int, str, str]]] = {name: set() for name in self._layers}

    def intercept(
        self, weights: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Load expert tensors as they stream past; yield all the others unchanged.
        Raises :class:`WeightLoadError` naming a tensor that does not fit."""
        for name, tensor in weights:
            match = self._pattern.match(name)
            if match is None or match.group(1) not in self._layers:
                yield name, tensor
                continue
            layer_name, expert, shard = match.group(1), int(match.group(2)), match.group(3)
            try:
                filled = self._layers[layer_name].load_expert_tensor(
                    match.group(4), tensor, expert, self._shards[shard]
                )
            except ValueError as error:
                raise WeightLoadError(f"checkpoint tensor {name}: {error}") from error
            self._filled[layer_name].add((expert, self._shards[shard], filled))

    def loaded_names(self) -> set[str]:
        """The expert parameters of every layer (``{layer}.w13`` and ``{layer}.w2`` for
        float experts). Raises :class:`WeightLoadError` naming the tensors a layer lacks."""
        loaded: set[str] = set()
        for layer_name, layer in self._layers.items():
            expected = {
                (expert, shard, tensor)
                for expert in range(layer.num_experts)
                for shard in EXPERT_SHARDS
                for tensor in layer.expert_tensor_names(shard)
            }
            missing = sorted(expected - self._filled[layer_name])
            if missing:
                shown = [
                    f"{layer_name}.experts.{expert}.{self._names[shard]}.{tensor}"
                    for expert, shard, tensor in missing[:8]
                ]
                more = f" (and {len(missing) - 8} more)" if len(missing) > 8 else ""
                raise WeightLoadError(f"checkpoint lacks expert tensors: {shown}{more}")
            module_name = self._module_names[layer_name]
            loaded.update(f"{module_name}.{name}" for name in layer.expert_param_names())
        return loaded
