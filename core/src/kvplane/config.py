"""Engine configuration: every option of ``LLM(...)``, ``kvplane serve`` and ``kvplane bench``."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from kvplane.spec_decode.config import SpeculativeConfig

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}

#: What ``kv_cache_dtype`` may name besides ``"auto"`` (the model dtype): the KV cache
#: stores keys and values in this dtype, with per-layer scales
#: (:func:`kvplane.ops.steps.quantize_kv`).
KV_CACHE_DTYPES: dict[str, torch.dtype] = {
    "fp8": torch.float8_e4m3fn,
    "fp8_e4m3": torch.float8_e4m3fn,
}


#: Fraction of device memory the engine may fill when the user names none.
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9


#: Fields set by the program that builds the engine, not by flags or environment variables.
INTERNAL_FIELDS = ("usage",)


@dataclass(frozen=True, slots=True)
class BatchLimits:
    """Most sequences in one step, and most new tokens in one step."""

    max_num_seqs: int
    max_num_batched_tokens: int


@dataclass(slots=True)
class EngineConfig:
    """Options of one engine. Validated on construction (``ValueError`` on bad values).

    ``skip_tokenizer_init`` loads no tokenizer: prompts must be token ids and requests
    must set ``detokenize=False`` (for models shipped without tokenizer files).
    KV-cache size: ``kv_cache_memory_bytes`` when set (the natural setting on CPU); else
    the platform's ``default_kv_cache_bytes`` when it has one and
    ``gpu_memory_utilization`` is not set; else ``gpu_memory_utilization`` (default
    :data:`DEFAULT_GPU_MEMORY_UTILIZATION`) of the device's memory minus what is in use
    after loading the weights and the profiled activation peak.
    """

    model: str | None = None
    device: str | None = None
    #: Run the platform of this name through its emulation (a host without its
    #: hardware, e.g. the CUDA platform's Triton kernels in Triton's interpreter); it is
    #: then the selected platform, as if named by ``device``.
    emulate: str | None = None
    dtype: str = "auto"
    #: Quantization method for linear layers; None follows the checkpoint's
    #: ``quantization_config`` (float when it has none).
    quantization: str | None = None
    load_format: str = "auto"
    #: What the KV cache stores keys and values as: "auto" (the model dtype), or "fp8"
    #: (alias "fp8_e4m3"): float8_e4m3fn with a per-tensor scale per layer and K / V
    #: (1.0, or the checkpoint's ``k_scale`` / ``v_scale``), half the bytes of bfloat16.
    kv_cache_dtype: str = "auto"
    tokenizer: str | None = None
    block_size: int = 16
    #: Batch limits; None: the device's defaults (:mod:`kvplane.engine.batch_limits`),
    #: filled in when the engine starts.
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float | None = None
    kv_cache_memory_bytes: int | None = None
    seed: int = 0
    enforce_eager: bool = False
    #: Largest step, in tokens, that is not a pure decode and still replays from a
    #: captured graph (0: such steps always run eagerly). Pure decodes are captured up to
    #: ``max_num_seqs`` sequences.
    max_mixed_graph_tokens: int = 512
    #: Overlap the host's work for step k + 1 with the device's run of step k (None: on
    #: where the platform runs asynchronously). Sequences with penalties or a grammar
    #: still run step by step, since they need their tokens on the host.
    async_scheduling: bool | None = None
    skip_tokenizer_init: bool = False
    #: Sampling defaults for the fields a request leaves out: "auto" (the model's
    #: recommended ones: its generation_config.json, or the embedded model's authors'),
    #: "kvplane" (the engine's own, e.g. temperature 1.0), or the path of a
    #: generation_config.json or its directory. See :mod:`kvplane.models.generation_config`.
    generation_config: str = "auto"
    #: generation_config.json sampling keys that win over ``generation_config``'s, e.g.
    #: ``{"temperature": 0.5}`` (``None`` as a value removes one).
    override_generation_config: dict[str, Any] | None = None
    #: ``AsyncLLM`` (the server) runs the engine in a child process, so that HTTP,
    #: tokenization and the engine's host work do not share one interpreter; False runs
    #: it on a thread of the server's process. The offline ``LLM`` always runs it in the
    #: caller's.
    engine_process: bool = True
    #: "offline" (whole batches: ``LLM``, the benchmarks) or "online" (requests as they
    #: come: ``kvplane serve`` sets it); picks the default batch limits.
    usage: str = "offline"
    #: Seconds between the server engine loop's stats lines (throughput, queue, KV-cache
    #: usage, where the loop's time goes; see :mod:`kvplane.engine.loop_stats`); 0: none.
    log_stats_interval: float = 10.0
    #: Speculative decoding, as vLLM spells it: ``{"method": "ngram",
    #: "num_speculative_tokens": 4, "prompt_lookup_max": 4}`` or ``{"method":
    #: "draft_model", "model": PATH, "num_speculative_tokens": 4}`` (None: off). See
    #: :mod:`kvplane.spec_decode.config` and docs/speculative-decoding.md.
    speculative_config: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.emulate is not None and self.device is not None:
            if self.device.split(":")[0] != self.emulate:
                raise ValueError(
                    f"emulate={self.emulate!r} selects that platform, but device="
                    f"{self.device!r} names another; give one of them"
                )
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.kv_cache_dtype != "auto" and self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"kv_cache_dtype must be 'auto' (the model dtype) or one of "
                f"{sorted(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}"
            )
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.log_stats_interval < 0:
            raise ValueError(f"log_stats_interval must be >= 0, got {self.log_stats_interval}")
        if self.max_num_seqs is not None and self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"
            )
        if self.max_mixed_graph_tokens < 0:
            raise ValueError(
                f"max_mixed_graph_tokens must be >= 0, got {self.max_mixed_graph_tokens}"
            )
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.gpu_memory_utilization is not None and not (
            0.0 < self.gpu_memory_utilization <= 1.0
        ):
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes <= 0:
            raise ValueError(
                f"kv_cache_memory_bytes must be positive, got {self.kv_cache_memory_bytes}"
            )
        if self.usage not in ("offline", "online"):
            raise ValueError(f"usage must be 'offline' or 'online', got {self.usage!r}")
        self._check_generation_config()
        self.resolved_speculative_config()  # a malformed one fails here, before any loading

    def batch_limits(self) -> BatchLimits:
        """The batch limits, once the engine has filled in the device's defaults."""
        if self.max_num_seqs is None or self.max_num_batched_tokens is None:
            raise RuntimeError("batch limits not resolved yet: the engine fills them in")
        return BatchLimits(self.max_num_seqs, self.max_num_batched_tokens)

    def resolved_kv_cache_dtype(self) -> torch.dtype | None:
        """The KV cache's dtype, or ``None`` for ``"auto"`` (the model's dtype)."""
        return KV_CACHE_DTYPES.get(self.kv_cache_dtype)

    def resolved_speculative_config(self) -> SpeculativeConfig | None:
        """``speculative_config`` validated (``ValueError`` naming the key at fault)."""
        if self.speculative_config is None:
            return None
        from kvplane.spec_decode.config import parse_speculative_config

        return parse_speculative_config(self.speculative_config)

    def _check_generation_config(self) -> None:
        # A bad path or key fails here, before the weights load, not at engine start.
        from kvplane.models.generation_config import (
            check_generation_config_option,
            check_override,
        )

        check_generation_config_option(self.generation_config)
        if self.override_generation_config is not None:
            if not isinstance(self.override_generation_config, dict):
                raise ValueError(
                    "override_generation_config must be a dict of generation_config.json "
                    f"keys, got {self.override_generation_config!r}"
                )
            check_override(self.override_generation_config)

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
        """Build from keyword arguments, rejecting unknown ones with the valid names."""
        known = {field.name for field in fields(cls)}
        unknown = set(kwargs) - known
        if unknown:
            raise TypeError(f"unknown engine options {sorted(unknown)}; valid: {sorted(known)}")
        return cls(**kwargs)
