"""The mixture-of-experts layer: routing, the platform op, and stacking expert weights."""

from __future__ import annotations

import pytest
import torch

from kvplane.models.layers.context import BuildContext
from kvplane.models.layers.moe import (
    MIXTRAL_EXPERT_NAMES,
    QWEN_EXPERT_NAMES,
    ExpertWeightLoader,
    FusedMoE,
    select_experts,
)
from kvplane.models.weights import WeightLoadError, check_all_loaded, load_named_weights
from kvplane.ops import reference
from kvplane.plugins import select_platform

NUM_EXPERTS, HIDDEN, INTERMEDIATE = 4, 16, 8


@pytest.fixture(scope="module")
def ctx() -> BuildContext:
    return BuildContext(select_platform("cpu"), torch.float32, torch.device("cpu"), 16)


class TinyMoEModel(torch.nn.Module):
    """Two MoE blocks under the names a decoder gives them."""

    def __init__(self, ctx: BuildContext) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(
            FusedMoE(NUM_EXPERTS, 2, HIDDEN, INTERMEDIATE, "silu", True, ctx) for _ in range(2)
        )


def _checkpoint(names: tuple[str, str, str], seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    gate, up, down = names
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(2):
        tensors[f"layers.{layer}.gate.weight"] = torch.randn(
            NUM_EXPERTS, HIDDEN, generator=generator
        )
        for expert in range(NUM_EXPERTS):
            prefix = f"layers.{layer}.experts.{expert}"
            for name, shape in (
                (gate, (INTERMEDIATE, HIDDEN)),
                (up, (INTERMEDIATE, HIDDEN)),
                (down, (HIDDEN, INTERMEDIATE)),
            ):
                tensors[f"{prefix}.{name}.weight"] = torch.randn(shape, generator=generator)
    return tensors


def _load(model: torch.nn.Module, tensors: dict[str, torch.Tensor], names) -> set[str]:
    experts = ExpertWeightLoader(model, names)
    loaded = load_named_weights(model, experts.intercept(tensors.items()), ())
    return loaded | experts.loaded_names()


def test_select_experts_keeps_the_most_probable() -> None:
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0], [3.0, 3.0, 0.0, 0.0]])
    weights, ids = select_experts(logits, 2, renormalize=False)
    probs = logits.softmax(dim=-1)
    assert ids[0].tolist() == [1, 2] and set(ids[1].tolist()) == {0, 1}  # ties: either order
    torch.testing.assert_close(weights, probs.gather(1, ids))
    renormalised, same_ids = select_experts(logits, 2, renormalize=True)
    assert torch.equal(same_ids, ids)
    torch.testing.assert_close(renormalised.sum(dim=-1), torch.ones(2))
    assert weights.dtype == renormalised.dtype == torch.float32


@pytest.mark.parametrize(
    "names", [MIXTRAL_EXPERT_NAMES, QWEN_EXPERT_NAMES], ids=["mixtral", "qwen"]
)
def test_expert_tensors_stack_and_the_layer_runs_the_op(ctx: BuildContext, names) -> None:
    model = TinyMoEModel(ctx)
    tensors = _checkpoint((names.gate, names.up, names.down))
    loaded = _load(model, tensors, names)
    check_all_loaded(model, loaded)
    moe = model.layers[1]
    assert torch.equal(
        moe.w13[2, :INTERMEDIATE], tensors[f"layers.1.experts.2.{names.gate}.weight"]
    )
    assert torch.equal(moe.w13[2, INTERMEDIATE:], tensors[f"layers.1.experts.2.{names.up}.weight"])
    assert torch.equal(moe.w2[3], tensors[f"layers.1.experts.3.{names.down}.weight"])

    hidden = torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(1))
    weights, ids = select_experts(hidden @ tensors["layers.1.gate.weight"].T, 2, True)
    expected = reference.fused_moe(hidden, moe.w13, moe.w2, weights, ids)
    torch.testing.assert_close(moe(hidden), expected)


def test_a_missing_expert_is_reported(ctx: BuildContext) -> None:
    model = TinyMoEModel(ctx)
    tensors = _checkpoint(("w1", "w3", "w2"))
    del tensors["layers.0.experts.3.w3.weight"]
    missing = r"lacks expert tensors.*layers\.0\.experts\.3\.w3\.weight"
    with pytest.raises(WeightLoadError, match=missing) as error:
        _load(model, tensors, MIXTRAL_EXPERT_NAMES)
    assert "w1" not in str(error.value) and "layers.1" not in str(error.value)


def test_misfit_expert_tensors_are_errors(ctx: BuildContext) -> None:
    model = TinyMoEModel(ctx)
    tensors = _checkpoint(("w1", "w3", "w2"))
    tensors["layers.0.experts.1.w2.weight"] = torch.zeros(HIDDEN, INTERMEDIATE + 1)
    with pytest.raises(WeightLoadError, match=r"layers\.0\.experts\.1\.w2\.weight: shape mismatch"):
        _load(model, tensors, MIXTRAL_EXPERT_NAMES)
    extra = {"layers.0.experts.4.w1.weight": torch.zeros(INTERMEDIATE, HIDDEN)}
    with pytest.raises(WeightLoadError, match="expert 4 out of range"):
        _load(model, extra, MIXTRAL_EXPERT_NAMES)


def test_bad_layer_settings_are_errors(ctx: BuildContext) -> None:
    with pytest.raises(ValueError, match="activation 'relu'"):
        FusedMoE(NUM_EXPERTS, 2, HIDDEN, INTERMEDIATE, "relu", True, ctx)
    with pytest.raises(ValueError, match="top_k"):
        FusedMoE(NUM_EXPERTS, 5, HIDDEN, INTERMEDIATE, "silu", True, ctx)
