"""Quantized linear layers on the CPU: the core's torch methods are the CPU's own.

``int8`` (:mod:`kvplane.quantization.int8`: weight-only, or W8A8 through
``torch._int_mm``, which CPUs with VNNI run fast), ``fp8``
(:mod:`kvplane.quantization.fp8`), ``gptq`` and ``awq``
(:mod:`kvplane.quantization.w4a16`) and ``gguf`` (:mod:`kvplane.quantization.gguf`) run
as the core wrote them; offering them here marks
them as the CPU's implementation rather than a fallback.
"""

from __future__ import annotations

from kvplane.quantization.base import QuantMethod
from kvplane.quantization.fp8 import Fp8Method
from kvplane.quantization.gguf import GgufMethod
from kvplane.quantization.int8 import Int8Method
from kvplane.quantization.w4a16 import AwqMethod, GptqMethod


def cpu_quant_methods() -> list[QuantMethod]:
    """The methods the CPU platform offers as its own."""
    return [Int8Method(), Fp8Method(), GptqMethod(), AwqMethod(), GgufMethod()]
