"""Quantization: the method interface and the unquantized reference."""

from kvplane.quantization.base import QuantMethod
from kvplane.quantization.unquantized import UnquantizedMethod

__all__ = ["QuantMethod", "UnquantizedMethod"]
