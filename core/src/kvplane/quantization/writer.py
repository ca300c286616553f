"""``kvplane quantize``: round-to-nearest quantization of a Hugging Face checkpoint into
the layouts kvplane's loaders (and vLLM's) read, with no calibration data.

Which tensors are quantized: the 2-D ``*_proj.weight`` matrices of the decoder layers
(attention and MLP projections) and the mixture-of-experts experts' matrices, each
expert's on its own as the tools write them (``experts.{e}.w1.weight`` ->
``experts.{e}.w1.weight`` + ``weight_scale``, or ``qweight`` / ``qzeros`` / ``scales``
(/ ``g_idx``)). Embeddings, norms, ``lm_head`` and the mixture-of-experts routers stay in
the checkpoint's float format, and the written ``quantization_config`` lists the float
modules in its ``ignore`` list.

Formats (``method``): ``fp8`` and ``int8`` write compressed-tensors W8A8 (per-channel
symmetric weight scales ``[output_size, 1]``, dynamic per-token activations); ``gptq``
(v1 layout: symmetric, no act-order) and ``awq`` (GEMM layout, zero points) write int4
weights with float16 scales per ``group_size`` inputs.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvplane.quantization.fp8 import quantize_rows_fp8
from kvplane.quantization.int4_rtn import quantize_awq_rtn, quantize_gptq_rtn

METHODS = ("fp8", "int8", "gptq", "awq")
#: Modules kept in float, as compressed-tensors ``ignore`` patterns (the routers:
#: Qwen-MoE's ``mlp.gate``, Mixtral's ``block_sparse_moe.gate``).
_FLOAT_MODULES = ["lm_head", "re:.*mlp.gate$", "re:.*block_sparse_moe.gate$", "re:.*router.*"]
#: Tensors quantized: a decoder layer's projection matrices (Qwen-MoE's experts'
#: included), and Mixtral's expert matrices ``experts.{e}.w1`` / ``w2`` / ``w3``.
_QUANTIZED_NAME = re.compile(r".*\.layers\.\d+\.(.*_proj|.*\.experts\.\d+\.w[123])\.weight$")
#: Matrices kept in float although their names match: mixture-of-experts routers, which
#: decide which experts run and are tiny.
_FLOAT_NAME = re.compile(r".*\.(router|gate)\..*")
#: Largest safetensors file written.
_SHARD_BYTES = 2 * 2**30


@dataclass(frozen=True, slots=True)
class QuantizeSummary:
    """What :func:`quantize_checkpoint` wrote."""

    num_quantized: int
    num_float: int
    num_shards: int
    num_bytes: int


def quantize_checkpoint(
    source: Path, target: Path, method: str, group_size: int = 128
) -> QuantizeSummary:
    """Write ``source`` (a safetensors Hugging Face directory) quantized with ``method``
    into ``target`` (created; must not hold a checkpoint already); ``group_size`` is the
    int4 methods' inputs per scale (-1: one group per row). Raises ValueError for an
    unknown method, a quantized source or a target that is not empty."""
    from kvplane.models.checkpoint import iterate_safetensors

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    config = json.loads((source / "config.json").read_text())
    if "quantization_config" in config:
        raise ValueError(f"{source} is already quantized ({config['quantization_config']})")
    if target.exists() and any(target.iterdir()):
        raise ValueError(f"{target} exists and is not empty")
    target.mkdir(parents=True, exist_ok=True)
    _copy_side_files(source, target)
    counts = {"quantized": 0, "float": 0}

    def converted() -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in iterate_safetensors(source):
            if tensor.dim() == 2 and _QUANTIZED_NAME.match(name) and not _FLOAT_NAME.match(name):
                counts["quantized"] += 1
                yield from _quantize_tensor(name, tensor, method, group_size)
            else:
                counts["float"] += 1
                yield name, tensor

    num_shards, num_bytes = _write_shards(converted(), target)
    config["quantization_config"] = quantization_config(method, group_size)
    (target / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return QuantizeSummary(counts["quantized"], counts["float"], num_shards, num_bytes)


def quantization_config(method: str, group_size: int = 128) -> dict[str, Any]:
    """The ``quantization_config`` a checkpoint written with ``method`` declares."""
    if method == "gptq":
        return {
            "quant_method": "gptq",
            "bits": 4,
            "group_size": group_size,
            "desc_act": False,
            "sym": True,
            "checkpoint_format": "gptq",
        }
    if method == "awq":
        return {
            "quant_method": "awq",
            "bits": 4,
            "group_size": group_size,
            "zero_point": True,
            "version": "gemm",
            "modules_to_not_convert": ["lm_head"],
        }
    return compressed_tensors_config(method)


def compressed_tensors_config(method: str) -> dict[str, Any]:
    """The ``quantization_config`` of a W8A8 checkpoint written by this module."""
    kind = "float" if method == "fp8" else "int"
    weights = {"num_bits": 8, "type": kind, "strategy": "channel", "symmetric": True}
    activations = {"num_bits": 8, "type": kind, "strategy": "token", "symmetric": True}
    group = {
        "targets": ["Linear"],
        "weights": {**weights, "dynamic": False, "group_size": None},
        "input_activations": {**activations, "dynamic": True, "group_size": None},
        "output_activations": None,
    }
    return {
        "quant_method": "compressed-tensors",
        "format": f"{kind}-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": group},
        "ignore": list(_FLOAT_MODULES),
        "kv_cache_scheme": None,
    }


def _quantize_tensor(
    name: str,
    weight: torch.Tensor,  # [output_size, input_size]
    method: str,
    group_size: int,
) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors that replace ``{prefix}.weight`` in ``method``'s layout."""
    prefix = name.removesuffix(".weight")
    if method in ("gptq", "awq"):
        group = weight.shape[1] if group_size == -1 else group_size
        rtn = quantize_gptq_rtn if method == "gptq" else quantize_awq_rtn
        for key, tensor in rtn(weight.float(), group).items():
            yield f"{prefix}.{key}", tensor.contiguous()
        return
    if method == "fp8":
        qweight, scale = quantize_rows_fp8(weight.float())
    else:
        max_abs = weight.float().abs().amax(dim=1, keepdim=True)  # [output_size, 1]
        scale = torch.where(max_abs > 0, max_abs / 127.0, torch.ones_like(max_abs))
        qweight = (weight.float() / scale).round_().clamp_(-127, 127).to(torch.int8)
    yield f"{prefix}.weight", qweight.contiguous()
    yield f"{prefix}.weight_scale", scale.float().contiguous()


def _write_shards(tensors: Iterator[tuple[str, torch.Tensor]], target: Path) -> tuple[int, int]:
    """Write ``tensors`` into safetensors files of at most ~2 GiB each (a shard is
    written as soon as it is full, so memory holds one shard) and, for several, the
    index; return (number of shards, bytes of tensor data)."""
    from safetensors.torch import save_file

    written: list[tuple[Path, list[str]]] = []
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = total = 0

    def flush() -> None:
        path = target / f"shard-{len(written):05d}.partial"
        save_file(shard, str(path), metadata={"format": "pt"})
        written.append((path, list(shard)))
        shard.clear()

    for name, tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + size > _SHARD_BYTES:
            flush()
            shard_bytes = 0
        shard[name] = tensor
        shard_bytes += size
        total += size
    if shard or not written:
        flush()
    weight_map: dict[str, str] = {}
    for index, (path, names) in enumerate(written):
        file_name = f"model-{index + 1:05d}-of-{len(written):05d}.safetensors"
        if len(written) == 1:
            file_name = "model.safetensors"
        path.rename(target / file_name)
        weight_map.update(dict.fromkeys(names, file_name))
    if len(written) > 1:
        index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (target / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2))
    return len(written), total


def _copy_side_files(source: Path, target: Path) -> None:
    """Tokenizer, generation config and the rest: every file but weights and config."""
    for path in source.iterdir():
        if path.is_file() and path.name != "config.json" and ".safetensors" not in path.name:
            shutil.copy2(path, target / path.name)
