"""Which quantization a model runs with: the user's request and the checkpoint's
``quantization_config``, reconciled into one method name and its layer options.

The layouts read here are the ones the common tools write:

* ``"fp8"`` (``quant_method: fp8``): e4m3 ``weight`` with a per-tensor ``weight_scale``;
  ``activation_scheme`` ``"dynamic"`` (per-token scales computed per step) or
  ``"static"`` (a per-tensor ``input_scale`` in the checkpoint).
* ``"compressed-tensors"`` with one config group targeting ``Linear``: 8-bit ``float``
  (FP8 W8A8) or ``int`` (INT8 W8A8) weights with ``tensor`` or ``channel`` scales
  (``weight_scale`` ``[1]`` or ``[output_size, 1]``), and 8-bit activations that are
  ``dynamic`` per ``token`` or static per ``tensor`` (``input_scale``).
* ``"gptq"`` (``bits`` 4, ``group_size``, ``desc_act``, ``checkpoint_format`` ``gptq``
  or ``gptq_v2``) and ``"awq"`` (``bits`` 4, ``version`` ``gemm``): int4 weights with
  float16 group scales and zero points (:mod:`kvplane.quantization.int4_packing`).

Everything else a checkpoint may declare is refused with the field that made it so.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

#: Option keys the core's methods read from :attr:`LayerQuantSpec.options`.
OPT_CHECKPOINT = "checkpoint_format"  # None: float checkpoint, quantized at load
OPT_WEIGHT_STRATEGY = "weight_strategy"  # "tensor" | "channel"
OPT_ACTIVATIONS = "activations"  # "dynamic" (per token) | "static" (per tensor) | None
OPT_GROUP_SIZE = "group_size"  # int4: input rows per scale (-1: one group)
OPT_ZEROS_OFFSET = "zeros_offset"  # int4: added to stored zero points (GPTQ v1: 1)


@dataclass(frozen=True, slots=True)
class QuantConfig:
    """The method every linear layer asks its platform for, and that method's options.

    ``ignored_layers`` are module-name patterns (exact names, dotted suffixes, or
    ``re:`` regular expressions as compressed-tensors writes them) left in float.
    """

    method: str = "none"
    options: tuple[tuple[str, Any], ...] = ()
    ignored_layers: tuple[str, ...] = field(default_factory=tuple)

    def option(self, key: str, default: Any = None) -> Any:
        return dict(self.options).get(key, default)


def resolve_quant_config(
    requested: str | None, hf_config: Any, is_gguf: bool = False
) -> QuantConfig:
    """Reconcile ``requested`` (the user's ``quantization``; None: follow the checkpoint)
    with ``hf_config.quantization_config`` (``is_gguf``: the weights come from a GGUF
    file, which ``"gguf"`` keeps quantized). Raises ValueError when they disagree or the
    checkpoint's layout is one kvplane does not read, naming the field."""
    if requested == "gguf":
        if not is_gguf:
            raise ValueError("quantization='gguf' keeps a GGUF file's blocks: load a .gguf")
        return QuantConfig("gguf", ((OPT_CHECKPOINT, "gguf"),))
    declared = getattr(hf_config, "quantization_config", None)
    if declared is None:
        if requested in (None, "none"):
            return QuantConfig()
        return _quantize_at_load(requested)
    if not isinstance(declared, Mapping):
        declared = declared.to_dict()  # transformers' QuantizationConfig objects
    checkpoint = parse_checkpoint_quant_config(declared)
    if requested not in (None, checkpoint.method):
        raise ValueError(
            f"the checkpoint is quantized with {checkpoint.method!r} "
            f"(quantization_config.quant_method {declared.get('quant_method')!r}); "
            f"quantization={requested!r} cannot change that: omit it or pass "
            f"{checkpoint.method!r}"
        )
    return checkpoint


def _quantize_at_load(requested: str) -> QuantConfig:
    if requested == "fp8":
        # Per-channel weight scales lose nothing against per-tensor ones and need no
        # calibration; activations are scaled per token each step.
        options = ((OPT_CHECKPOINT, None), (OPT_WEIGHT_STRATEGY, "channel"))
        return QuantConfig("fp8", (*options, (OPT_ACTIVATIONS, "dynamic")))
    # Other names (int8, a platform's own methods) carry no options: the method decides.
    return QuantConfig(requested, ((OPT_CHECKPOINT, None),))


def parse_checkpoint_quant_config(declared: Mapping[str, Any]) -> QuantConfig:
    """The :class:`QuantConfig` of a checkpoint's ``quantization_config`` mapping."""
    quant_method = declared.get("quant_method")
    if quant_method == "fp8":
        return _parse_fp8(declared)
    if quant_method == "compressed-tensors":
        return _parse_compressed_tensors(declared)
    if quant_method in ("gptq", "awq"):
        return _parse_int4(declared, quant_method)
    raise ValueError(
        f"quantization_config.quant_method {quant_method!r} is not supported; kvplane "
        "reads 'fp8', 'compressed-tensors' (FP8 / INT8 W8A8), 'gptq' and 'awq' checkpoints"
    )


def _parse_int4(declared: Mapping[str, Any], method: str) -> QuantConfig:
    """GPTQ (AutoGPTQ / GPTQModel) and AWQ (AutoAWQ, GEMM version) int4 layouts."""
    if declared.get("bits") != 4:
        raise ValueError(f"quantization_config.bits {declared.get('bits')!r}: only 4 is read")
    group_size = declared.get("group_size", 128)
    if not isinstance(group_size, int) or (group_size <= 0 and group_size != -1):
        raise ValueError(f"quantization_config.group_size must be positive or -1: {group_size!r}")
    options: list[tuple[str, Any]] = [(OPT_CHECKPOINT, method), (OPT_GROUP_SIZE, group_size)]
    if method == "gptq":
        checkpoint_format = declared.get("checkpoint_format", "gptq")
        if checkpoint_format not in ("gptq", "gptq_v2"):
            raise ValueError(
                f"quantization_config.checkpoint_format {checkpoint_format!r}: 'gptq' or "
                "'gptq_v2' are read"
            )
        # v1 stores each zero point minus one; v2 the zero point itself.
        options.append((OPT_ZEROS_OFFSET, 1 if checkpoint_format == "gptq" else 0))
    else:
        if str(declared.get("version", "gemm")).lower() != "gemm":
            raise ValueError(
                f"quantization_config.version {declared.get('version')!r}: only AWQ's "
                "'gemm' layout is read"
            )
        if declared.get("zero_point") is False:
            raise ValueError("quantization_config.zero_point false: AWQ GEMM has zero points")
        options.append((OPT_ZEROS_OFFSET, 0))
    ignored = declared.get("modules_to_not_convert") or ()
    return QuantConfig(method, tuple(options), tuple(ignored))


def _parse_fp8(declared: Mapping[str, Any]) -> QuantConfig:
    if declared.get("weight_block_size"):
        raise ValueError(
            "quantization_config.weight_block_size "
            f"{declared['weight_block_size']!r}: block-wise FP8 scales are not supported "
            "(per-tensor scales are)"
        )
    scheme = declared.get("activation_scheme", "dynamic")
    if scheme not in ("dynamic", "static"):
        raise ValueError(
            f"quantization_config.activation_scheme must be 'dynamic' or 'static', got {scheme!r}"
        )
    ignored = declared.get("ignored_layers") or declared.get("modules_to_not_convert") or ()
    options = ((OPT_CHECKPOINT, "fp8"), (OPT_WEIGHT_STRATEGY, "tensor"))
    return QuantConfig("fp8", (*options, (OPT_ACTIVATIONS, scheme)), tuple(ignored))


def _parse_compressed_tensors(declared: Mapping[str, Any]) -> QuantConfig:
    groups = declared.get("config_groups") or {}
    if len(groups) != 1:
        raise ValueError(
            f"quantization_config.config_groups has {len(groups)} groups; kvplane reads "
            "checkpoints with exactly one (every Linear quantized the same way)"
        )
    ((group_name, group),) = groups.items()
    where = f"quantization_config.config_groups.{group_name}"
    targets = group.get("targets") or []
    if targets != ["Linear"]:
        raise ValueError(f"{where}.targets must be ['Linear'], got {targets!r}")
    weights = group.get("weights") or {}
    num_bits, kind = weights.get("num_bits"), weights.get("type")
    if num_bits != 8 or kind not in ("float", "int"):
        raise ValueError(
            f"{where}.weights: num_bits {num_bits!r} type {kind!r} is not supported "
            "(8-bit float or int are)"
        )
    strategy = weights.get("strategy")
    if strategy not in ("tensor", "channel"):
        raise ValueError(
            f"{where}.weights.strategy must be 'tensor' or 'channel', got {strategy!r}"
        )
    if weights.get("symmetric") is False:
        raise ValueError(f"{where}.weights.symmetric false: asymmetric 8-bit weights")
    activations = _parse_ct_activations(group.get("input_activations"), where)
    if kind == "int" and activations == "static":
        raise ValueError(
            f"{where}.input_activations: static activation scales with INT8 weights are "
            "not supported (dynamic per-token ones are)"
        )
    method = "fp8" if kind == "float" else "int8"
    options = (
        (OPT_CHECKPOINT, "compressed-tensors"),
        (OPT_WEIGHT_STRATEGY, strategy),
        (OPT_ACTIVATIONS, activations),
    )
    return QuantConfig(method, options, tuple(declared.get("ignore") or ()))


def _parse_ct_activations(activations: Mapping[str, Any] | None, where: str) -> str | None:
    """``"dynamic"`` (per-token scales), ``"static"`` (one checkpoint ``input_scale``) or
    None (weight-only)."""
    if activations is None:
        return None
    where = f"{where}.input_activations"
    if activations.get("num_bits") != 8:
        raise ValueError(f"{where}.num_bits must be 8, got {activations.get('num_bits')!r}")
    strategy, dynamic = activations.get("strategy"), bool(activations.get("dynamic"))
    if dynamic and strategy == "token":
        return "dynamic"
    if not dynamic and strategy == "tensor":
        return "static"
    raise ValueError(
        f"{where}: strategy {strategy!r} with dynamic {dynamic} is not supported "
        "(dynamic per-token or static per-tensor are)"
    )


def is_ignored(module_name: str, patterns: tuple[str, ...]) -> bool:
    """Whether ``module_name`` matches one of a checkpoint's ignore ``patterns``."""
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.match(pattern[3:], module_name):
                return True
        elif module_name == pattern or module_name.endswith(f".{pattern}"):
            return True
    return False
