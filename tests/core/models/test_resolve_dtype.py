"""``dtype="auto"`` follows the checkpoint without tripping transformers' deprecations."""

from __future__ import annotations

from types import SimpleNamespace
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


class _Platform:
    """What ``resolve_dtype`` reads of a platform, for one that prefers float16 and has no
    bfloat16 (an Apple GPU before macOS 14)."""

    name = "half-only"
    info = SimpleNamespace(supported_dtypes=("float16", "float32"))

    def supports_dtype(self, dtype: torch.dtype) -> bool:
        return str(dtype).removeprefix("torch.") in self.info.supported_dtypes


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [("bfloat16", torch.float16), ("float32", torch.float32), (None, torch.float32)],
)
def test_auto_falls_back_to_the_platforms_preferred_dtype(dtype: Any, expected: Any) -> None:
    # A checkpoint dtype the platform lacks runs in the platform's first listed dtype;
    # one it has, or none named, is unchanged.
    platform: Any = _Platform()
    assert resolve_dtype("auto", _ConfigWithDeprecatedProperty(dtype), platform) == expected


def test_auto_keeps_float32_where_the_platform_lists_it_first() -> None:
    # The CPU lists float32 first: a dtype it lacked would fall back to float32 as before.
    assert select_platform("cpu").info.supported_dtypes[0] == "float32"
