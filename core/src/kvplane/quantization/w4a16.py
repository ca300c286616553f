"""``gptq`` and ``awq``: int4 weights, float activations (W4A16), in torch.

Weights stay packed as the checkpoint holds them (:mod:`kvplane.quantization.int4_packing`
describes both layouts): GPTQ ``qweight`` int32 ``[input_size / 8, output_size]``,
``qzeros`` int32 ``[num_groups, output_size / 8]``, float16 ``scales [num_groups,
output_size]`` and ``g_idx`` int32 ``[input_size]``; AWQ ``qweight`` int32 ``[input_size,
output_size / 8]`` with the same ``qzeros`` and ``scales``. Both put output columns last,
so the rows of stacked matrices (Q, K, V) are columns here: their
:class:`~kvplane.quantization.params.ShardLayout` has ``output_dim=1``.

A float checkpoint with ``quantization="gptq"`` or ``"awq"`` is quantized at load by
round-to-nearest (:mod:`kvplane.quantization.int4_rtn`, group size 128 unless the option
says otherwise). :meth:`Int4Method.apply` dequantizes in slices and multiplies; a
platform with a dequantizing matmul kernel subclasses the method and replaces
:meth:`Int4Method.matmul`. Mixture-of-experts experts are linear layers of the method, one
gate/up and one down per expert (:mod:`kvplane.quantization.experts`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kvplane.quantization.base import QuantMethod, register_bias
from kvplane.quantization.config import OPT_CHECKPOINT, OPT_GROUP_SIZE, OPT_ZEROS_OFFSET
from kvplane.quantization.int4_packing import (
    PACK_FACTOR,
    is_sequential_g_idx,
    w4a16_linear_reference,
)
from kvplane.quantization.int4_rtn import quantize_awq_rtn, quantize_gptq_rtn
from kvplane.quantization.params import ShardLayout, register_param

if TYPE_CHECKING:
    # Annotation only: kvplane.plugins imports this module (circular at run time).
    from kvplane.plugins.types import LayerQuantSpec

#: Group size of int4 weights quantized at load.
DEFAULT_GROUP_SIZE = 128


class Int4Method(QuantMethod):
    """W4A16 in the ``layout`` of the subclass; see the module docstring."""

    layout = "gptq"
    #: Added to every stored zero point (GPTQ's v1 checkpoints store zero - 1).
    default_zeros_offset = 1
    experts_as_linear_layers = True

    def can_implement(self, spec: LayerQuantSpec) -> tuple[bool, str]:
        if spec.params_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return False, f"{self.name} needs float activations, not {spec.params_dtype}"
        group_size = self._group_size(spec)
        if spec.input_size % group_size:
            return False, (
                f"input_size {spec.input_size} is not a multiple of group_size {group_size}"
            )
        if any(size % PACK_FACTOR for size in spec.shard_sizes):
            return False, f"output sizes {spec.shard_sizes} are not multiples of {PACK_FACTOR}"
        if spec.input_size % PACK_FACTOR:
            return False, f"input_size {spec.input_size} is not a multiple of {PACK_FACTOR}"
        return True, ""

    def _group_size(self, spec: LayerQuantSpec) -> int:
        group_size = int(dict(spec.options).get(OPT_GROUP_SIZE, DEFAULT_GROUP_SIZE))
        return spec.input_size if group_size == -1 else group_size

    def create_weights(self, layer: torch.nn.Module, spec: LayerQuantSpec) -> None:
        options = dict(spec.options)
        group_size = self._group_size(spec)
        # torch's __setattr__ stub admits only Tensor | Module; nn.Module stores any value.
        layer.int4_group_size = group_size  # type: ignore[assignment]
        layer.int4_zeros_offset = int(  # type: ignore[assignment]
            options.get(OPT_ZEROS_OFFSET, self.default_zeros_offset)
        )
        if options.get(OPT_CHECKPOINT) is None:
            super().create_weights(layer, spec)  # float weights, quantized after loading
            return
        num_inputs, num_outputs = spec.input_size, spec.output_size
        num_groups = num_inputs // group_size
        packed_columns = ShardLayout(output_dim=1, packed_factor=PACK_FACTOR)
        zeros = torch.empty(num_groups, num_outputs // PACK_FACTOR, dtype=torch.int32)
        register_param(layer, "qzeros", zeros, packed_columns)
        scales = torch.empty(num_groups, num_outputs, dtype=torch.float16)
        register_param(layer, "scales", scales, ShardLayout(output_dim=1))
        if self.layout == "gptq":
            qweight = torch.empty(num_inputs // PACK_FACTOR, num_outputs, dtype=torch.int32)
            register_param(layer, "qweight", qweight, ShardLayout(output_dim=1))
            g_idx = torch.empty(num_inputs, dtype=torch.int32)
            register_param(layer, "g_idx", g_idx, ShardLayout(output_dim=None))
        else:
            qweight = torch.empty(num_inputs, num_outputs // PACK_FACTOR, dtype=torch.int32)
            register_param(layer, "qweight", qweight, packed_columns)
        register_bias(layer, spec)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Quantize float weights (quantized at load); drop a ``g_idx`` that only says
        ``row // group_size``, so the product takes the contiguous-groups path."""
        weight = getattr(layer, "weight", None)
        if isinstance(weight, torch.Tensor):
            group_size = int(layer.int4_group_size)  # type: ignore[arg-type]
            if self.layout == "gptq":
                zeros_offset = int(layer.int4_zeros_offset)  # type: ignore[arg-type]
                packed = quantize_gptq_rtn(weight.data, group_size, zeros_offset=zeros_offset)
            else:
                packed = quantize_awq_rtn(weight.data, group_size)
            del layer.weight
            for name, tensor in packed.items():
                layer.register_parameter(name, torch.nn.Parameter(tensor, requires_grad=False))
        g_idx = getattr(layer, "g_idx", None)
        group_size = int(layer.int4_group_size)  # type: ignore[arg-type]
        if isinstance(g_idx, torch.Tensor) and is_sequential_g_idx(g_idx, group_size):
            layer.register_parameter("g_idx", None)

    def matmul(
        self,
        layer: torch.nn.Module,
        x: torch.Tensor,  # [num_tokens, input_size]
    ) -> torch.Tensor:  # [num_tokens, output_size]
        """``x @ W.T`` for the packed weight (no bias)."""
        qweight, qzeros, scales, g_idx = int4_params(layer)
        return w4a16_linear_reference(
            x,
            qweight,
            qzeros,
            scales,
            g_idx,
            layout=self.layout,
            group_size=int(layer.int4_group_size),  # type: ignore[arg-type]
            zeros_offset=int(layer.int4_zeros_offset),  # type: ignore[arg-type]
        )

    def apply(
        self,
        layer: torch.nn.Module,
        x: torch.Tensor,  # [num_tokens, input_size]
    ) -> torch.Tensor:  # [num_tokens, output_size]
        out = self.matmul(layer, x)
        bias = layer.bias
        assert bias is None or isinstance(bias, torch.Tensor)
        return out if bias is None else out + bias


def int4_params(
    layer: torch.nn.Module,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``layer``'s ``(qweight, qzeros, scales, g_idx)``, typed (``g_idx`` None for AWQ
    and for GPTQ without act-order)."""
    qweight, qzeros, scales = layer.qweight, layer.qzeros, layer.scales
    g_idx = getattr(layer, "g_idx", None)
    assert isinstance(qweight, torch.Tensor) and isinstance(qzeros, torch.Tensor)
    assert isinstance(scales, torch.Tensor)
    assert g_idx is None or isinstance(g_idx, torch.Tensor)
    return qweight, qzeros, scales, g_idx


class GptqMethod(Int4Method):
    """``gptq``: AutoGPTQ / GPTQModel layout, act-order included."""

    name = "gptq"
    layout = "gptq"
    default_zeros_offset = 1


class AwqMethod(Int4Method):
    """``awq``: AutoAWQ's GEMM layout (interleaved nibbles, true zero points)."""

    name = "awq"
    layout = "awq"
    default_zeros_offset = 0
