"""The session's SmolLM2 engine, shared by the engine and structured-output tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kvplane import LLM
from tests.core.engine.conftest import assert_no_block_leak, make_llm


@pytest.fixture(scope="session")
def smollm_llm() -> Iterator[LLM]:
    """SmolLM2 on the cpu platform (``make_llm``'s defaults). One per session (a pytest-xdist
    worker), whichever directory's tests ask first: loading one takes about 20 s of CPU."""
    llm = make_llm()
    yield llm
    assert_no_block_leak(llm)
