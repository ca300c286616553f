"""Copying named checkpoint tensors into a kvplane model, with clear errors."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from kvplane.models.kv_scales import is_unused_attention_scale, load_kv_scale, match_kv_scale
from kvplane.models.layers.linear import Linear


class WeightLoadError(ValueError):
    """The checkpoint does not fit the model: tensors missing, unexpected or misshapen."""


def load_named_weights(
    model: torch.nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    stacked_params: Sequence[tuple[str, str, int | None]],
    ignored_suffixes: Sequence[str] = (),
) -> set[str]:
    """Copy ``(checkpoint name, tensor)`` pairs into ``model``; return the model
    parameter names (with shard suffixes for stacked layers) that were filled.

    ``stacked_params`` entries are ``(ours, theirs, shard index)``: a checkpoint name
    containing ``.theirs.`` goes to shard ``shard index`` of the Linear ``.ours.``;
    shard index None means the checkpoint tensor is already fused and fills every shard
    (:meth:`Linear.load_fused`). FP8 KV-cache scales go to their attention layers
    (:mod:`kvplane.models.kv_scales`) and are not in the returned names (they are
    optional).

    Raises :class:`WeightLoadError` naming the tensors that match no parameter.
    """
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    unexpected: list[str] = []
    for name, tensor in weights:
        if name.endswith(tuple(ignored_suffixes)) or is_unused_attention_scale(name):
            continue
        kv_scale = match_kv_scale(name)
        if kv_scale is not None:
            try:
                load_kv_scale(modules, name, kv_scale, tensor)
            except ValueError as error:
                raise WeightLoadError(str(error)) from error
            continue
        target, shard_index = _resolve_stacked(name, stacked_params)
        module_name, _, param_kind = target.rpartition(".")
        module = modules.get(module_name)
        if isinstance(module, Linear):
            try:
                if shard_index is None:
                    filled = module.load_fused(param_kind, tensor)
                else:
                    filled = module.load_shard(param_kind, tensor, shard_index)
            except ValueError as error:
                raise WeightLoadError(f"checkpoint tensor {name}: {error}") from error
            shards = range(len(module.output_sizes)) if shard_index is None else [shard_index]
            loaded.update(f"{module_name}.{filled}#{i}" for i in shards)
        elif target in params:
            param = params[target]
            if param.shape != tensor.shape:
                raise WeightLoadError(
                    f"shape mismatch for {name}: checkpoint {tuple(tensor.shape)}, "
                    f"model {tuple(param.shape)}"
                )
            param.data.copy_(tensor)
            loaded.add(target)
        else:
            unexpected.append(name)
    if unexpected:
        raise WeightLoadError(f"checkpoint tensors match no model parameter: {unexpected}")
    return loaded


def expected_weight_names(model: torch.nn.Module) -> set[str]:
    """Names :func:`load_named_weights` must fill for ``model`` to be complete."""
    expected: set[str] = set()
    for module_name, module in model.named_modules():
        if isinstance(module, Linear):
            # Every parameter the layer's quantization method reads, per shard.
            for param_name in module.quant_method.checkpoint_param_names(module):
                for shard in range(len(module.output_sizes)):
                    expected.add(f"{module_name}.{param_name}#{shard}")
    linear_prefixes = tuple(
        f"{name}." for name, module in model.named_modules() if isinstance(module, Linear)
    )
    for name, _ in model.named_parameters():
        if not name.startswith(linear_prefixes):
            expected.add(name)
    return expected


def check_all_loaded(model: torch.nn.Module, loaded: set[str]) -> None:
    """Raise :class:`WeightLoadError` naming every parameter the checkpoint lacked."""
    missing = sorted(expected_weight_names(model) - loaded)
    if missing:
        shown = [name.replace("#", " shard ") for name in missing[:20]]
        more = f" (and {len(missing) - 20} more)" if len(missing) > 20 else ""
        raise WeightLoadError(f"checkpoint lacks tensors for: {shown}{more}")


def _resolve_stacked(
    name: str, stacked_params: Sequence[tuple[str, str, int | None]]
) -> tuple[str, int | None]:
    for ours, theirs, shard in stacked_params:
        marker = f".{theirs}."
        if marker in name:
            return name.replace(marker, f".{ours}."), shard
    return name, 0
