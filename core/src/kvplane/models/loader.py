"""Building a model on the selected platform and filling its weights."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from kvplane.models.base import CausalLM
from kvplane.models.checkpoint import checkpoint_files, iterate_weights
from kvplane.models.kv_scales import describe_kv_scales
from kvplane.models.layers.context import BuildContext
from kvplane.models.layers.linear import Linear
from kvplane.models.layers.moe import FusedMoE
from kvplane.models.registry import architecture_of, model_class
from kvplane.models.source import ModelSource
from kvplane.models.weights import check_all_loaded
from kvplane.quantization.config import is_ignored

logger = logging.getLogger(__name__)

LOAD_FORMATS = ("auto", "dummy")


def build_model(
    hf_config: Any, ctx: BuildContext, source: ModelSource | None, load_format: str = "auto"
) -> CausalLM:
    """Construct the model for ``hf_config`` on ``ctx.device`` and load its weights
    (``load_format="dummy"``: random weights, needing only the config)."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {load_format!r}")
    architecture = architecture_of(hf_config)
    started = time.perf_counter()
    with torch.device(ctx.device):
        model = model_class(architecture)(hf_config, ctx)
    _leave_ignored_layers_unquantized(model, ctx.quantization.ignored_layers)
    if load_format == "dummy":
        _fill_random(model)
    else:
        if source is None:
            raise ValueError("load_format='auto' needs a model source")
        native_gguf = ctx.quantization.method == "gguf"
        loaded = _load_with_progress(model, source, hf_config, native_gguf)
        check_all_loaded(model, loaded)
    if (kv_scales := describe_kv_scales(model)) is not None:
        logger.info("%s", kv_scales)
    for module in model.modules():
        if isinstance(module, (Linear, FusedMoE)):
            module.process_weights_after_loading()
    model.eval()
    num_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    logger.info(
        "loaded %s from %s (%.1f MiB of weights, %s) in %.1f s",
        architecture,
        "random weights" if load_format == "dummy" or source is None else source.display_name,
        num_bytes / 2**20,
        ctx.dtype,
        time.perf_counter() - started,
    )
    return model


def _leave_ignored_layers_unquantized(model: torch.nn.Module, patterns: tuple[str, ...]) -> None:
    """Linear layers the checkpoint's quantization config lists as not converted keep
    float weights."""
    if not patterns:
        return
    for name, module in model.named_modules():
        if isinstance(module, Linear) and is_ignored(name, patterns):
            module.leave_unquantized()


#: Seconds of loading before the progress bar appears (quick loads print no bar).
PROGRESS_DELAY_S = 2.0


def _load_with_progress(
    model: CausalLM, source: ModelSource, hf_config: Any, native_gguf: bool
) -> set[str]:
    """``model.load_weights`` with a bar of checkpoint bytes read (shown past a delay)."""
    from tqdm import tqdm

    num_bytes = sum(path.stat().st_size for path in checkpoint_files(source))
    with tqdm(
        total=num_bytes,
        desc="loading weights",
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        delay=PROGRESS_DELAY_S,
        dynamic_ncols=True,
    ) as progress:
        weights = iterate_weights(source, hf_config, progress.update, native_gguf)
        loaded = model.load_weights(weights)
        progress.update(progress.total - progress.n)  # file headers and metadata
        return loaded


def _fill_random(model: torch.nn.Module) -> None:
    """Seeded random weights, drawn in place on the parameters' device (no host copy)."""
    generators: dict[torch.device, torch.Generator] = {}
    for name, param in model.named_parameters():
        if param.device not in generators:
            generators[param.device] = torch.Generator(device=param.device).manual_seed(0)
        generator = generators[param.device]
        if param.dtype.is_floating_point:
            param.data.normal_(0.0, 0.02, generator=generator)
            if name.endswith("norm.weight") or ".norm." in name:
                param.data.add_(1.0)
