"""Quantized linear layers on CUDA: FP8 W8A8 through ``torch._scaled_mm``; GGUF blocks and
int4 GPTQ/AWQ weights through Triton matmuls that dequantize them in their K loop.

Storage and loading are the core's (:mod:`kvplane.quantization.fp8`,
:mod:`kvplane.quantization.gguf`); only the per-step product differs. FP8: activations
are quantized per token by one Triton kernel and multiplied with the FP8 weight on the
tensor cores, the per-token and per-row scales applied in the matmul's epilogue. GGUF:
up to :data:`GGUF_KERNEL_MAX_TOKENS` tokens the kernel reads the blocks directly (it beats
dequantizing first there); larger steps dequantize one part of the weight and use cuBLAS.
W4A16: up to :data:`W4A16_KERNEL_MAX_TOKENS` tokens the Triton kernel reads the packed
words; larger steps dequantize the whole weight to the activation dtype and use cuBLAS.
"""

from __future__ import annotations

import torch

from kvplane.plugins.types import LayerQuantSpec
from kvplane.quantization.base import QuantMethod
from kvplane.quantization.fp8 import Fp8Method
from kvplane.quantization.gguf import GgufMethod
from kvplane.quantization.gguf_blocks import GGUFBlockFormat, dequantize_rows
from kvplane.quantization.int4_packing import dequantize_int4
from kvplane.quantization.w4a16 import AwqMethod, GptqMethod, Int4Method, int4_params

#: ``torch._scaled_mm`` needs both matrix dimensions of the weight in multiples of this.
SCALED_MM_ALIGNMENT = 16
#: Largest step whose GGUF products read the blocks in the kernel; larger steps
#: dequantize and use cuBLAS, which is faster for them.
GGUF_KERNEL_MAX_TOKENS = 64
#: Largest step whose int4 products run in the W4A16 kernel; larger steps dequantize
#: the weight and use cuBLAS, which is faster for them.
W4A16_KERNEL_MAX_TOKENS = 256


class ScaledMmFp8Method(Fp8Method):
    """FP8 W8A8 with ``torch._scaled_mm`` (row-wise scales, bfloat16 output)."""

    priority = 10

    def can_implement(self, spec: LayerQuantSpec) -> tuple[bool, str]:
        ok, reason = super().can_implement(spec)
        if not ok:
            return ok, reason
        if spec.params_dtype != torch.bfloat16:
            return False, f"row-wise scaled FP8 matmuls write bfloat16, not {spec.params_dtype}"
        sizes = (spec.input_size, spec.output_size)
        if any(size % SCALED_MM_ALIGNMENT for size in sizes):
            return False, (
                f"input and output sizes {sizes} must be multiples of {SCALED_MM_ALIGNMENT}"
            )
        return True, ""

    def quantize_rows(
        self,
        x: torch.Tensor,  # [num_tokens, input_size]
    ) -> tuple[torch.Tensor, torch.Tensor]:  # e4m3 [num_tokens, input_size], f32 [.., 1]
        # Imported here: plugin discovery must not need Triton.
        from kvplane_cuda.kernels.fp8_quant import quantize_rows_fp8

        return quantize_rows_fp8(x.contiguous())

    def scaled_matmul(
        self,
        x_fp8: torch.Tensor,  # e4m3 [num_tokens, input_size]
        x_scale: torch.Tensor,  # float32 [num_tokens, 1]
        weight: torch.Tensor,  # e4m3 [output_size, input_size]
        weight_scale: torch.Tensor,  # float32 [output_size]
        bias: torch.Tensor | None,  # [output_size]
        out_dtype: torch.dtype,
    ) -> torch.Tensor:  # [num_tokens, output_size] out_dtype
        return torch._scaled_mm(
            x_fp8,
            weight.t(),  # [input_size, output_size], column-major as the kernel wants
            scale_a=x_scale.contiguous(),
            scale_b=weight_scale.view(1, -1),
            bias=bias,
            out_dtype=out_dtype,
        )


class TritonGgufMethod(GgufMethod):
    """GGUF blocks multiplied by :func:`kvplane_cuda.kernels.gguf_matmul.gguf_matmul`."""

    priority = 10

    def shard_matmul(
        self,
        x: torch.Tensor,  # [num_tokens, input_size]
        raw: torch.Tensor,  # uint8 [rows, bytes_per_row]
        fmt: GGUFBlockFormat,
    ) -> torch.Tensor:  # [num_tokens, rows]
        if x.shape[0] > GGUF_KERNEL_MAX_TOKENS:
            weight = dequantize_rows(raw, fmt, x.shape[-1], dtype=x.dtype)
            return torch.nn.functional.linear(x, weight)
        # Imported here: plugin discovery must not need Triton.
        from kvplane_cuda.kernels.gguf_matmul import gguf_matmul

        return gguf_matmul(x.contiguous(), raw, fmt)


class TritonInt4Method(Int4Method):
    """``matmul`` of :class:`~kvplane.quantization.w4a16.Int4Method` by
    :func:`kvplane_cuda.kernels.w4a16_matmul.w4a16_matmul`."""

    priority = 10

    def matmul(
        self,
        layer: torch.nn.Module,
        x: torch.Tensor,  # [num_tokens, input_size]
    ) -> torch.Tensor:  # [num_tokens, output_size]
        qweight, qzeros, scales, g_idx = int4_params(layer)
        group_size = int(layer.int4_group_size)  # type: ignore[arg-type]
        zeros_offset = int(layer.int4_zeros_offset)  # type: ignore[arg-type]
        if x.shape[0] > W4A16_KERNEL_MAX_TOKENS:
            weight = dequantize_int4(
                self.layout,
                qweight,
                qzeros,
                scales,
                g_idx,
                group_size=group_size,
                zeros_offset=zeros_offset,
            )  # [output_size, input_size] float32
            return torch.nn.functional.linear(x, weight.to(x.dtype))
        # Imported here: plugin discovery must not need Triton.
        from kvplane_cuda.kernels.w4a16_matmul import w4a16_matmul

        return w4a16_matmul(
            x,
            qweight,
            qzeros,
            scales,
            g_idx,
            layout=self.layout,
            group_size=group_size,
            zeros_offset=zeros_offset,
        )


class TritonGptqMethod(TritonInt4Method, GptqMethod):
    """``gptq`` with the Triton W4A16 kernel."""


class TritonAwqMethod(TritonInt4Method, AwqMethod):
    """``awq`` with the Triton W4A16 kernel."""


def cuda_quant_methods() -> list[QuantMethod]:
    """The methods the CUDA platform implements itself."""
    return [ScaledMmFp8Method(), TritonGgufMethod(), TritonGptqMethod(), TritonAwqMethod()]
