"""Fixtures shared by the whole test suite."""

from __future__ import annotations

import importlib.util
import os

import pytest

# Tests never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _interpreter_scalar_loop_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton 3.6's interpreter turns a loop bound into an int with ``int(array)`` of a
    one-element array, which numpy >= 2.4 refuses (triton-lang/triton#9171); the CUDA
    platform's kernels (and the benchmarks' probes) loop to bounds read from device
    memory, so squeeze first. Interpreter mode only."""
    if os.environ.get("TRITON_INTERPRET") != "1" or importlib.util.find_spec("triton") is None:
        return
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor: object, scope: interpreter._LangPatchScope) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    monkeypatch.setattr(interpreter, "_patch_lang_tensor", patch_lang_tensor)
