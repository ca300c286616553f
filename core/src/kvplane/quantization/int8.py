"""``int8``: int8 linear layers with per-output-channel symmetric scales, in torch.

Each output channel ``n`` of ``W: [output_size, input_size]`` is stored as
``round(W[n] / s[n])`` in ``[-127, 127]`` with ``s[n] = max|W[n]| / 127``, a quarter of
the float32 bytes (half of bfloat16's). :meth:`Int8Method.apply` multiplies by
the dequantized weight, so the result equals a float layer whose weights were rounded to
the int8 grid. With dynamic activations (the layer option ``("activations",
"dynamic")``, as INT8 W8A8 checkpoints declare, or the older ``("dynamic_activations",
True)``) each token's activations are quantized to int8 too and the product runs in
integers through ``torch._int_mm`` (much faster on CPUs with VNNI, slightly less
accurate).

Weights come from a float checkpoint (quantized at load) or from a compressed-tensors
INT8 checkpoint: ``weight`` int8 ``[output_size, input_size]`` and ``weight_scale``
``[output_size, 1]`` (channel strategy) or one scale per stacked matrix (tensor).
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

#: Largest input size whose int8 x int8 dot products cannot overflow int32.
MAX_INT_MM_INPUT_SIZE = (2**31 - 1) // (127 * 127)
#: ``torch._int_mm`` on CUDA needs more rows than this.
_INT_MM_MIN_ROWS = 16
_OPTIONS = ("dynamic_activations", OPT_ACTIVATIONS, OPT_CHECKPOINT, OPT_WEIGHT_STRATEGY)


def quantize_per_channel(
    weight: torch.Tensor,  # [output_size, input_size] float
) -> tuple[torch.Tensor, torch.Tensor]:  # int8 [output_size, input_size], float32 [output_size]
    """Symmetric per-output-channel int8 quantization; an all-zero row gets scale 1."""
    weight = weight.float()
    max_abs = weight.abs().amax(dim=1)  # [output_size]
    scale = torch.where(max_abs > 0, max_abs / 127.0, torch.ones_like(max_abs))
    qweight = (weight / scale.unsqueeze(1)).round_().clamp_(-127, 127).to(torch.int8)
    return qweight, scale


def _dynamic_activations(spec: LayerQuantSpec) -> bool:
    options = dict(spec.options)
    return bool(options.get("dynamic_activations")) or options.get(OPT_ACTIVATIONS) == "dynamic"


class Int8Method(QuantMethod):
    """Int8 weights, float activations (optionally int8 activations, see module doc).

    Lifecycle: :meth:`create_weights` registers the float ``weight`` the loader fills (or
    the checkpoint's int8 ``weight`` and ``weight_scale``);
    :meth:`process_weights_after_loading` leaves ``weight_int8`` and a per-row
    ``weight_scale`` (a float weight is dropped); :meth:`apply` runs per step.
    """

    name = "int8"
    priority = 0
    experts_as_linear_layers = True

    def can_implement(self, spec: LayerQuantSpec) -> tuple[bool, str]:
        if not spec.params_dtype.is_floating_point:
            return False, f"int8 quantizes floating-point weights, not {spec.params_dtype}"
        options = dict(spec.options)
        unknown = sorted(set(options) - set(_OPTIONS))
        if unknown:
            return False, f"unknown int8 options {unknown}; supported: {list(_OPTIONS)}"
        if options.get(OPT_ACTIVATIONS) == "static":
            return False, "int8 reads dynamic per-token activation scales, not static ones"
        if _dynamic_activations(spec) and spec.input_size > MAX_INT_MM_INPUT_SIZE:
            return False, (
                f"input_size {spec.input_size} could overflow int32 accumulation of int8 "
                f"activations (max {MAX_INT_MM_INPUT_SIZE}); use weight-only int8"
            )
        return True, ""

    def create_weights(self, layer: torch.nn.Module, spec: LayerQuantSpec) -> None:
        # torch's __setattr__ stub admits only Tensor | Module; nn.Module stores any value.
        layer.int8_dynamic_activations = _dynamic_activations(spec)  # type: ignore[assignment]
        layer.int8_shard_sizes = spec.shard_sizes  # type: ignore[assignment]
        options = dict(spec.options)
        if options.get(OPT_CHECKPOINT) is None:
            super().create_weights(layer, spec)  # float weights, quantized after loading
            return
        weight = torch.empty(spec.output_size, spec.input_size, dtype=torch.int8)
        register_param(layer, "weight", weight)
        if options.get(OPT_WEIGHT_STRATEGY) == "channel":
            scale = torch.empty(spec.output_size, 1, dtype=torch.float32)
            register_param(layer, "weight_scale", scale)
        else:
            scale = torch.empty(len(spec.shard_sizes), dtype=torch.float32)
            register_param(layer, "weight_scale", scale, ShardLayout(per_shard=True))
        register_bias(layer, spec)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Leave ``weight_int8`` + per-row ``weight_scale`` ``[output_size]``; drop
        ``weight``."""
        weight = layer.weight
        assert isinstance(weight, torch.Tensor), "create_weights registered it"
        if weight.dtype == torch.int8:
            scale_param = layer.weight_scale
            assert isinstance(scale_param, torch.Tensor)
            shard_sizes = getattr(layer, "int8_shard_sizes", ())
            qweight, scale = weight.data, per_row_scales(scale_param.data, shard_sizes)
        else:
            qweight, scale = quantize_per_channel(weight.data)
        del layer.weight
        layer.weight_int8 = torch.nn.Parameter(qweight, requires_grad=False)
        layer.weight_scale = torch.nn.Parameter(scale.contiguous(), requires_grad=False)

    def apply(
        self,
        layer: torch.nn.Module,
        x: torch.Tensor,  # [num_tokens, input_size]
    ) -> torch.Tensor:  # [num_tokens, output_size]
        qweight, scale, bias = _int8_params(layer)
        if getattr(layer, "int8_dynamic_activations", False):
            return _int8_activation_linear(qweight, scale, bias, x)
        # The scale is per output channel, so it applies after the product:
        # x @ (q * s).T == (x @ q.T) * s, and the product never holds a scaled weight.
        out = F.linear(x, qweight.to(x.dtype)) * scale.to(x.dtype)
        return out if bias is None else out + bias


def _int8_params(
    layer: torch.nn.Module,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``layer``'s ``(weight_int8, weight_scale, bias)``, typed (torch types module
    attributes as ``Tensor | Module``)."""
    qweight, scale, bias = layer.weight_int8, layer.weight_scale, layer.bias
    assert isinstance(qweight, torch.Tensor) and isinstance(scale, torch.Tensor)
    assert bias is None or isinstance(bias, torch.Tensor)
    return qweight, scale, bias


def _int8_activation_linear(
    qweight: torch.Tensor,  # [output_size, input_size] int8
    scale: torch.Tensor,  # [output_size] float32
    bias: torch.Tensor | None,  # [output_size] or None
    x: torch.Tensor,  # [..., input_size]
) -> torch.Tensor:  # [..., output_size]
    """Per-token int8 activations times int8 weights, accumulated in int32."""
    rows = x.reshape(-1, x.shape[-1]).float()  # [num_tokens, input_size]
    max_abs = rows.abs().amax(dim=1, keepdim=True)  # [num_tokens, 1]
    x_scale = torch.where(max_abs > 0, max_abs / 127.0, torch.ones_like(max_abs))
    x_int8 = (rows / x_scale).round_().clamp_(-127, 127).to(torch.int8)
    num_tokens = x_int8.shape[0]
    if num_tokens <= _INT_MM_MIN_ROWS:
        # CUDA's _int_mm takes more than 16 rows; zero rows change no real row's result.
        x_int8 = F.pad(x_int8, (0, 0, 0, _INT_MM_MIN_ROWS + 1 - num_tokens))
    acc = torch._int_mm(x_int8, qweight.t())[:num_tokens]  # [num_tokens, output_size] int32
    out = (acc.float() * x_scale * scale).to(x.dtype)
    out = out.view(*x.shape[:-1], out.shape[-1])
    return out if bias is None else out + bias
