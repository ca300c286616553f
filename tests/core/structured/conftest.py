"""Shared fixtures: the embedded SmolLM2 tokenizer and engine, loaded once per session."""

from __future__ import annotations

from typing import Any

import pytest

from kvplane import LLM
from kvplane.models.config import load_tokenizer
from kvplane.models.source import resolve_model
from kvplane.structured import StructuredOutputCompiler

#: SmolLM2's vocabulary and its EOS (<|im_end|>), as the engine resolves them.
VOCAB_SIZE = 49152
EOS_TOKEN_ID = 2


@pytest.fixture(scope="session")
def smollm_tokenizer() -> Any:
    return load_tokenizer(resolve_model(None, "auto"))


@pytest.fixture(scope="session")
def compiler(smollm_tokenizer: Any) -> StructuredOutputCompiler:
    return StructuredOutputCompiler(smollm_tokenizer, VOCAB_SIZE, [EOS_TOKEN_ID])


@pytest.fixture(scope="session")
def structured_llm(smollm_llm: LLM) -> LLM:
    """The session's SmolLM2 engine (``tests/core/conftest.py``): same settings, and
    another would cost its own load."""
    return smollm_llm
