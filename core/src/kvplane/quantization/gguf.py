"""``gguf``: linear layers that keep a GGUF file's quantized blocks in memory.

The loader (:func:`kvplane.models.checkpoint.iterate_gguf` with ``native=True``) hands
each projection of a supported block type (:mod:`kvplane.quantization.gguf_blocks`) over
as its raw bytes under the name ``gguf_<TYPE>`` (``uint8 [rows, bytes_per_row]``), and
any other projection as float ``weight``. Each stacked matrix (Q, K, V; gate, up) keeps
its own bytes and type, since a GGUF file may quantize them differently (Q4_K_M stores
some V matrices as Q6_K): a layer whose shards share one type is one matrix of bytes,
otherwise one per shard.

Per step :meth:`GgufMethod.apply` multiplies with the bytes dequantized in slices of rows
(:func:`~kvplane.quantization.gguf_blocks.gguf_linear_reference`); a platform with a
kernel replaces :meth:`GgufMethod.shard_matmul`. Only a GGUF file asks for this method,
so :meth:`GgufMethod.can_implement` refuses float checkpoints.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from kvplane.quantization.base import QuantMethod, register_bias
from kvplane.quantization.config import OPT_CHECKPOINT
from kvplane.quantization.gguf_blocks import (
    GGUFBlockFormat,
    gguf_block_format,
    gguf_linear_reference,
    validate_raw,
)

if TYPE_CHECKING:
    # Annotation only: kvplane.plugins imports this module (circular at run time).
    from kvplane.plugins.types import LayerQuantSpec

#: Prefix of the checkpoint names that carry raw blocks: ``gguf_Q4_1`` and so on.
RAW_PREFIX = "gguf_"


class GgufMethod(QuantMethod):
    """GGUF blocks kept quantized; see the module docstring."""

    name = "gguf"

    def can_implement(self, spec: LayerQuantSpec) -> tuple[bool, str]:
        if dict(spec.options).get(OPT_CHECKPOINT) != "gguf":
            return False, "gguf reads a GGUF file's blocks; this checkpoint is not GGUF"
        if spec.params_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return False, f"gguf needs float activations, not {spec.params_dtype}"
        return True, ""

    def create_weights(self, layer: torch.nn.Module, spec: LayerQuantSpec) -> None:
        # torch's __setattr__ stub admits only Tensor | Module; nn.Module stores any value.
        layer.gguf_spec = spec  # type: ignore[assignment]
        #: Per shard: (format, bytes) or (None, float weight), filled while loading.
        layer.gguf_loaded = [None] * len(spec.shard_sizes)  # type: ignore[assignment]
        register_bias(layer, spec)

    def checkpoint_param_names(self, layer: torch.nn.Module) -> list[str]:
        return ["weight", *(["bias"] if layer.bias is not None else [])]

    def load_checkpoint_tensor(
        self, layer: torch.nn.Module, name: str, loaded: torch.Tensor, shard_index: int
    ) -> str | None:
        spec: LayerQuantSpec = layer.gguf_spec  # type: ignore[assignment]
        num_rows = spec.shard_sizes[shard_index]
        if name.startswith(RAW_PREFIX):
            fmt = gguf_block_format(name.removeprefix(RAW_PREFIX))
            validate_raw(loaded, fmt, num_rows, spec.input_size)
            _loaded_shards(layer)[shard_index] = (fmt, loaded.contiguous())
            return "weight"
        if name == "weight":
            if tuple(loaded.shape) != (num_rows, spec.input_size):
                raise ValueError(
                    f"shape mismatch for weight shard {shard_index}: checkpoint "
                    f"{tuple(loaded.shape)}, model {(num_rows, spec.input_size)}"
                )
            weight = loaded.to(spec.params_dtype)
            _loaded_shards(layer)[shard_index] = (None, weight)
            return "weight"
        return None  # the bias: copied by the layer

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Join the shards that share one block type into one matrix of bytes; register
        each part as ``gguf_weight_{i}`` with its format in ``layer.gguf_formats``."""
        shards = [shard for shard in _loaded_shards(layer) if shard is not None]
        assert len(shards) == len(_loaded_shards(layer)), "the loader checks completeness"
        formats = {fmt for fmt, _ in shards}
        parts = [shards] if len(formats) == 1 else [[shard] for shard in shards]
        layer.gguf_formats = [part[0][0] for part in parts]  # type: ignore[assignment]
        for index, part in enumerate(parts):
            tensors = [tensor for _, tensor in part]
            data = torch.cat(tensors) if len(tensors) > 1 else tensors[0]
            layer.register_parameter(
                f"gguf_weight_{index}", torch.nn.Parameter(data, requires_grad=False)
            )
        del layer.gguf_loaded

    def shard_matmul(
        self,
        x: torch.Tensor,  # [num_tokens, input_size]
        raw: torch.Tensor,  # uint8 [rows, bytes_per_row]
        fmt: GGUFBlockFormat,
    ) -> torch.Tensor:  # [num_tokens, rows]
        """``x @ W.T`` for one part's bytes."""
        return gguf_linear_reference(x, raw, fmt, raw.shape[0], x.shape[-1])

    def apply(
        self,
        layer: torch.nn.Module,
        x: torch.Tensor,  # [num_tokens, input_size]
    ) -> torch.Tensor:  # [num_tokens, output_size]
        rows = x.reshape(-1, x.shape[-1])
        outputs = []
        for index, fmt in enumerate(layer.gguf_formats):  # type: ignore[arg-type]
            data = getattr(layer, f"gguf_weight_{index}")
            if fmt is None:
                outputs.append(F.linear(rows, data))
            else:
                outputs.append(self.shard_matmul(rows, data, fmt))
        out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)
        out = out.view(*x.shape[:-1], out.shape[-1])
        bias = layer.bias
        assert bias is None or isinstance(bias, torch.Tensor)
        return out if bias is None else out + bias


#: One shard as loaded: (format, bytes) or (None, float weight); None until loaded.
LoadedShard = tuple[GGUFBlockFormat | None, torch.Tensor] | None


def _loaded_shards(layer: torch.nn.Module) -> list[LoadedShard]:
    """The shards loaded so far (typed: torch types module attributes loosely)."""
    shards = layer.gguf_loaded
    assert isinstance(shards, list)
    return shards
