"""Model-level settings derived from the checkpoint and the engine options."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from kvplane.config import DTYPES, EngineConfig
from kvplane.models.generation_config import SamplingDefaults, resolve_sampling_defaults
from kvplane.models.registry import architecture_of
from kvplane.models.source import ModelSource, read_generation_eos_ids, resolve_model
from kvplane.plugins.platform import Platform

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """What the engine needs to know about the model before building it."""

    source: ModelSource
    hf_config: Any
    architecture: str
    dtype: torch.dtype
    max_model_len: int
    eos_token_ids: frozenset[int]
    #: What a request gets for the sampling fields it leaves out (``generation_config``).
    sampling_defaults: SamplingDefaults = field(default_factory=SamplingDefaults)


def load_hf_config(source: ModelSource) -> Any:
    from transformers import AutoConfig

    if source.builtin_config is not None:
        from kvplane.models.builtin_configs import builtin_config

        return builtin_config(source.builtin_config)
    return AutoConfig.from_pretrained(str(source.directory), **source.hf_kwargs())


def load_engine_tokenizer(config: EngineConfig, source: ModelSource) -> Any | None:
    """The tokenizer an engine of ``config`` uses for the model at ``source``: None with
    ``skip_tokenizer_init`` or when the model has no tokenizer files and
    ``config.tokenizer`` names none."""
    if config.skip_tokenizer_init:
        return None
    if not (source.has_files or config.tokenizer is not None):
        return None
    return load_tokenizer(source, config.tokenizer)


@functools.lru_cache(maxsize=4)
def load_tokenizer(source: ModelSource, tokenizer: str | None = None) -> Any:
    """The tokenizer (with chat template) from ``tokenizer`` or the model source.

    Cached per process: building one from a GGUF vocabulary takes seconds, and engines
    only read it.
    """
    from transformers import AutoTokenizer

    if tokenizer is not None:
        return AutoTokenizer.from_pretrained(tokenizer)
    return AutoTokenizer.from_pretrained(str(source.directory), **source.hf_kwargs())


def resolve_dtype(requested: str, hf_config: Any, platform: Platform) -> torch.dtype:
    """``auto`` takes the checkpoint's dtype if the platform supports it; a checkpoint dtype
    the platform lacks takes the platform's preferred dtype (the first it lists: float16
    on Apple GPUs without bfloat16), and a checkpoint that names none float32."""
    if requested != "auto":
        dtype = DTYPES[requested]
        if not platform.supports_dtype(dtype):
            raise ValueError(
                f"platform {platform.name!r} does not support {requested}; supported: "
                f"{platform.info.supported_dtypes}"
            )
        return dtype
    # transformers 5 keeps ``torch_dtype`` only as a property that warns on each read;
    # older configs store it as a plain attribute.
    config_dtype = getattr(hf_config, "dtype", None) or vars(hf_config).get("torch_dtype")
    if isinstance(config_dtype, str):
        config_dtype = DTYPES.get(config_dtype)
    if not isinstance(config_dtype, torch.dtype):
        return torch.float32
    if platform.supports_dtype(config_dtype):
        return config_dtype
    preferred = platform.info.supported_dtypes[0]
    logger.info(
        "platform %r has no %s: running the model in its preferred %s",
        platform.name,
        str(config_dtype).removeprefix("torch."),
        preferred,
    )
    return DTYPES[preferred]


def resolve_model_config(config: EngineConfig, platform: Platform) -> ModelConfig:
    source = resolve_model(config.model, config.load_format)
    hf_config = load_hf_config(source)
    derived_len = int(getattr(hf_config, "max_position_embeddings", 2048))
    max_model_len = config.max_model_len or derived_len
    if max_model_len > derived_len:
        raise ValueError(f"max_model_len {max_model_len} exceeds the model's context {derived_len}")
    eos_ids = read_generation_eos_ids(source)
    config_eos = getattr(hf_config, "eos_token_id", None)
    if not eos_ids and config_eos is not None:
        eos_ids = {config_eos} if isinstance(config_eos, int) else set(config_eos)
    sampling_defaults = resolve_sampling_defaults(
        source, config.generation_config, config.override_generation_config
    )
    logger.info("%s", sampling_defaults.describe())
    return ModelConfig(
        source=source,
        hf_config=hf_config,
        architecture=architecture_of(hf_config),
        dtype=resolve_dtype(config.dtype, hf_config, platform),
        max_model_len=max_model_len,
        eos_token_ids=frozenset(eos_ids),
        sampling_defaults=sampling_defaults,
    )
