"""Fixtures shared by the platform tests."""

from __future__ import annotations

import zlib

import pytest
import torch


@pytest.fixture
def generator(request: pytest.FixtureRequest) -> torch.Generator:
    """A CPU generator seeded from the test's id, so each test reproduces on its own."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))
