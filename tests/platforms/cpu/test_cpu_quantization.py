"""The CPU platform offers the core's torch quantization methods as its own."""

from __future__ import annotations

import torch

from kvplane.plugins import select_platform
from kvplane.plugins.types import LayerQuantSpec
from kvplane.quantization.fp8 import Fp8Method
from kvplane.quantization.int8 import Int8Method
from kvplane.quantization.unquantized import UnquantizedMethod


def test_offered_by_the_platform_next_to_unquantized() -> None:
    platform = select_platform("cpu")
    spec = LayerQuantSpec("int8", 128, 64, torch.bfloat16)
    assert platform.quant_method_names(spec) == {"int8", "fp8", "gptq", "awq", "gguf", "none"}
    for name in ("int8", "fp8", "gptq", "awq"):
        method = platform.quant_method(LayerQuantSpec(name, 128, 64, torch.bfloat16))
        assert method.name == name and not method.is_reference_fallback
    int8 = platform.quant_method(spec)
    assert isinstance(int8, Int8Method) and not int8.is_reference_fallback
    fp8 = platform.quant_method(LayerQuantSpec("fp8", 128, 64, torch.bfloat16))
    assert isinstance(fp8, Fp8Method) and not fp8.is_reference_fallback
    none_spec = LayerQuantSpec("none", 128, 64, torch.bfloat16)
    assert isinstance(platform.quant_method(none_spec), UnquantizedMethod)
