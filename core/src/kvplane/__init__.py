"""kvplane: a hardware-neutral LLM inference engine with pluggable platforms.

``from kvplane import LLM, SamplingParams`` mirrors vLLM's offline API. Heavy modules
(torch, transformers) load on first use of these names, so ``kvplane platforms`` and
plugin discovery stay fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kvplane.version import __version__

if TYPE_CHECKING:
    from kvplane.config import EngineConfig
    from kvplane.engine.async_llm import AsyncLLM
    from kvplane.engine.llm import LLM
    from kvplane.engine.llm_engine import LLMEngine
    from kvplane.engine.outputs import CompletionOutput, RequestOutput
    from kvplane.sampling.params import SamplingParams

_LAZY = {
    "LLM": "kvplane.engine.llm",
    "AsyncLLM": "kvplane.engine.async_llm",
    "LLMEngine": "kvplane.engine.llm_engine",
    "EngineConfig": "kvplane.config",
    "RequestOutput": "kvplane.engine.outputs",
    "CompletionOutput": "kvplane.engine.outputs",
    "SamplingParams": "kvplane.sampling.params",
}

__all__ = [
    "LLM",
    "AsyncLLM",
    "CompletionOutput",
    "EngineConfig",
    "LLMEngine",
    "RequestOutput",
    "SamplingParams",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kvplane' has no attribute {name!r}")
