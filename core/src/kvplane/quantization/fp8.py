"""``fp8``: FP8 (e4m3) weights and activations, the torch reference every platform has.

Storage after loading, whatever the source: ``weight`` float8_e4m3fn ``[output_size,
input_size]`` and ``weight_scale`` float32 ``[output_size]`` (``W ~ weight * scale``
per output row), plus ``input_scale`` float32 ``[1]`` when activations are scaled
statically. A checkpoint's per-tensor scales (one per stacked matrix) become per-row
scales without touching the FP8 values, so nothing is requantized. A float checkpoint
is quantized at load with per-row scales ``max|W[n]| / 448``.

Per step the activations are quantized to e4m3 (per token from their own maximum, or by
the static scale) and multiplied with the FP8 weight; :class:`Fp8Method` does the
product in the activations' dtype (both operands hold exact FP8 values) and scales the
result. A platform with FP8 matmuls subclasses it and replaces
:meth:`Fp8Method.scaled_matmul` (and :meth:`Fp8Method.quantize_rows` with a kernel).
Mixture-of-experts experts are linear layers of this method, one gate/up and one down per
expert (:mod:`kvplane.quantization.experts`), so they load and multiply the same way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from kvplane.quantization.base import QuantMethod, register_bias
from kvplane.quantization.config import OPT_ACTIVATIONS, OPT_CHECKPOINT, OPT_WEIGHT_STRATEGY
from kvplane.quantization.params import ShardLayout, per_row_scales, register_param

if TYPE_CHECKING:
    # Annotation only: kvplane.plugins imports this module (circular at run time).
    from kvplane.plugins.types import LayerQuantSpec

FP8_DTYPE = torch.float8_e4m3fn
#: Largest finite e4m3 value.
FP8_MAX = 448.0
#: Smallest scale: keeps an all-zero row or token from dividing by zero.
MIN_SCALE = 1.0 / (FP8_MAX * 512.0)


def quantize_rows_fp8(
    values: torch.Tensor,  # [num_rows, num_columns] float
) -> tuple[torch.Tensor, torch.Tensor]:  # e4m3 [num_rows, num_columns], float32 [num_rows, 1]
    """Symmetric per-row e4m3 quantization: ``values ~ q * scale``."""
    max_abs = values.abs().amax(dim=1, keepdim=True).float()  # [num_rows, 1]
    scale = (max_abs / FP8_MAX).clamp_(min=MIN_SCALE)
    return quantize_with_scale_fp8(values, scale), scale


def quantize_with_scale_fp8(
    values: torch.Tensor,  # [num_rows, num_columns] float
    scale: torch.Tensor,  # float32, broadcastable: [num_rows, 1] or [1]
) -> torch.Tensor:  # e4m3 [num_rows, num_columns]
    """``values / scale`` saturated to the e4m3 range (a cast alone would give NaN)."""
    return (values.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


class Fp8Method(QuantMethod):
    """FP8 W8A8 linear layers; see the module docstring for storage and arithmetic.

    Options (``spec.options``, from :mod:`kvplane.quantization.config`):
    ``checkpoint_format`` (None: float weights quantized at load), ``weight_strategy``
    (``"tensor"``: one scale per stacked matrix; ``"channel"``: one per output row) and
    ``activations`` (``"dynamic"`` per token, or ``"static"``: a checkpoint
    ``input_scale`` per matrix, the largest of which scales the shared input).
    """

    name = "fp8"
    priority = 0
    experts_as_linear_layers = True

    def can_implement(self, spec: LayerQuantSpec) -> tuple[bool, str]:
        if spec.params_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return False, f"fp8 needs float activations, not {spec.params_dtype}"
        options = dict(spec.options)
        if options.get(OPT_ACTIVATIONS, "dynamic") not in ("dynamic", "static"):
            return False, f"fp8 activations must be dynamic or static: {options}"
        return True, ""

    def create_weights(self, layer: torch.nn.Module, spec: LayerQuantSpec) -> None:
        options = dict(spec.options)
        layer.fp8_shard_sizes = spec.shard_sizes  # type: ignore[assignment]
        if options.get(OPT_CHECKPOINT) is None:
            super().create_weights(layer, spec)  # float weights, quantized after loading
            return
        num_shards = len(spec.shard_sizes)
        weight = torch.empty(spec.output_size, spec.input_size, dtype=FP8_DTYPE)
        register_param(layer, "weight", weight)
        if options.get(OPT_WEIGHT_STRATEGY) == "channel":
            scale = torch.empty(spec.output_size, 1, dtype=torch.float32)
            register_param(layer, "weight_scale", scale)
        else:
            scale = torch.empty(num_shards, dtype=torch.float32)
            register_param(layer, "weight_scale", scale, ShardLayout(per_shard=True))
        if options.get(OPT_ACTIVATIONS) == "static":
            input_scale = torch.empty(num_shards, dtype=torch.float32)
            register_param(layer, "input_scale", input_scale, ShardLayout(per_shard=True))
        register_bias(layer, spec)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        weight = layer.weight
        assert isinstance(weight, torch.Tensor)
        if weight.dtype != FP8_DTYPE:  # a float checkpoint
            qweight, column_scale = quantize_rows_fp8(weight.data)
            row_scale = column_scale.view(-1)
        else:
            scale = layer.weight_scale
            assert isinstance(scale, torch.Tensor)
            shard_sizes = getattr(layer, "fp8_shard_sizes", ())
            qweight, row_scale = weight.data, per_row_scales(scale.data, shard_sizes)
        layer.weight = torch.nn.Parameter(qweight, requires_grad=False)
        layer.weight_scale = torch.nn.Parameter(row_scale.contiguous(), requires_grad=False)
        input_scale = getattr(layer, "input_scale", None)
        if isinstance(input_scale, torch.Tensor):
            # The stacked matrices share one input: its largest scale never saturates.
            shared = input_scale.data.amax().reshape(1).float()
            layer.input_scale = torch.nn.Parameter(shared, requires_grad=False)
        else:
            layer.register_parameter("input_scale", None)

    def quantize_input(
        self,
        layer: torch.nn.Module,
        x: torch.Tensor,  # [num_tokens, input_size]
    ) -> tuple[torch.Tensor, torch.Tensor]:  # e4m3 [num_tokens, input_size], f32 [.., 1]
        """``x`` in e4m3 and its scales: the layer's static scale, or per token through
        :meth:`quantize_rows` (which a platform may replace by a kernel)."""
        input_scale = layer.input_scale
        if isinstance(input_scale, torch.Tensor):
            scale = input_scale.expand(x.shape[0], 1)
            return quantize_with_scale_fp8(x, scale), scale
        return self.quantize_rows(x)

    def quantize_rows(
        self,
        x: torch.Tensor,  # [num_tokens, input_size]
    ) -> tuple[torch.Tensor, torch.Tensor]:  # e4m3 [num_tokens, input_size], f32 [.., 1]
        """Per-token e4m3 quantization of ``x``."""
        return quantize_rows_fp8(x)

    def apply(
        self,
        layer: torch.nn.Module,
        x: torch.Tensor,  # [..., input_size]
    ) -> torch.Tensor:  # [..., output_size]
        weight, weight_scale, bias = fp8_params(layer)
        rows = x.reshape(-1, x.shape[-1])
        x_fp8, x_scale = self.quantize_input(layer, rows)
        out = self.scaled_matmul(x_fp8, x_scale, weight, weight_scale, bias, x.dtype)
        return out.view(*x.shape[:-1], out.shape[-1])

    def scaled_matmul(
        self,
        x_fp8: torch.Tensor,  # e4m3 [num_tokens, input_size]
        x_scale: torch.Tensor,  # float32 [num_tokens, 1]
        weight: torch.Tensor,  # e4m3 [output_size, input_size]
        weight_scale: torch.Tensor,  # float32 [output_size]
        bias: torch.Tensor | None,  # [output_size]
        out_dtype: torch.dtype,
    ) -> torch.Tensor:  # [num_tokens, output_size] out_dtype
        """``(x_fp8 * x_scale) @ (weight * weight_scale).T + bias``: the step a platform
        with FP8 matmuls replaces."""
        # e4m3 values are exact in bfloat16 and float32, so this product is the FP8
        # product up to accumulation order (float16 could overflow on 448 * 448 * K).
        compute_dtype = torch.float32 if out_dtype == torch.float32 else torch.bfloat16
        out = F.linear(x_fp8.to(compute_dtype), weight.to(compute_dtype)).float()
        out = (out * x_scale * weight_scale).to(out_dtype)
        return out if bias is None else out + bias


def fp8_params(
    layer: torch.nn.Module,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``layer``'s ``(weight, weight_scale, bias)`` after loading, typed (torch types
    module attributes as ``Tensor | Module``)."""
    weight, weight_scale, bias = layer.weight, layer.weight_scale, layer.bias
    assert isinstance(weight, torch.Tensor) and isinstance(weight_scale, torch.Tensor)
    assert bias is None or isinstance(bias, torch.Tensor)
    return weight, weight_scale, bias
