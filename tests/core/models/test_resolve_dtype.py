"""``dtype="auto"`` follows the checkpoint without tripping transformers' deprecations."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kvplane.models.config import resolve_dtype
from kvplane.plugins import select_platform


class _ConfigWithDeprecatedProperty:
    """transformers 5's shape: ``dtype`` stored, ``torch_dtype`` a warning property."""

    def __init__(self, dtype: Any) -> None:
        self.dtype = dtype

    @property
    def torch_dtype(self) -> Any:
        raise AssertionError("torch_dtype read: transformers would warn at start-up")


class _OldConfig:
    """Older transformers: ``torch_dtype`` a plain attribute."""

    def __init__(self, torch_dtype: Any) -> None:
        self.torch_dtype = torch_dtype


@pytest.mark.parametrize("dtype", [None, "bfloat16", torch.float16])
def test_auto_does_not_read_the_deprecated_property(dtype: Any) -> None:
    platform = select_platform("cpu")
    expected = {None: torch.float32, "bfloat16": torch.bfloat16, torch.float16: torch.float16}
    assert resolve_dtype("auto", _ConfigWithDeprecatedProperty(dtype), platform) == expected[dtype]


def test_auto_reads_torch_dtype_of_older_configs() -> None:
    assert resolve_dtype("auto", _OldConfig("bfloat16"), select_platform("cpu")) == torch.bfloat16
