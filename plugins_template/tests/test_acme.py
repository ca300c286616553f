"""Acme's own tests: probe, selection, and attention against kvplane's reference.

Run from this folder with ``pytest`` (the package installed, e.g. ``pip install -e .``);
kvplane's conformance kit runs separately with
``pytest --pyargs kvplane.testing --kvplane-platform acme``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from kvplane.attention.reference import ReferenceAttentionBackend
from kvplane.plugins import (
    PlatformSelectionError,
    register_platform,
    select_platform,
    unregister_platform,
)
from kvplane.plugins.types import AttentionSpec
from kvplane.testing.helpers import make_attention_spec, make_paged_batch_for
from kvplane_acme import plugin, probe
from kvplane_acme.attention import AcmeAttentionBackend


@pytest.fixture(autouse=True)
def acme_registered() -> Iterator[None]:
    """Make ``acme`` discoverable even when the package is not pip-installed."""
    register_platform("acme", plugin)
    yield
    unregister_platform("acme")


def test_probe_available_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(probe.AVAILABLE_ENV, raising=False)
    result = plugin.kvplane_platform_probe()
    assert result.available
    assert result.score == probe.PROBE_SCORE


def test_probe_unavailable_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(probe.AVAILABLE_ENV, "0")
    result = plugin.kvplane_platform_probe()
    assert not result.available
    assert probe.AVAILABLE_ENV in result.reason
    with pytest.raises(PlatformSelectionError, match="Acme driver not found"):
        select_platform("acme")


def test_select_acme_resolves_hooks_with_reference_fallbacks(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv(probe.AVAILABLE_ENV, raising=False)
    with caplog.at_level(logging.INFO):
        platform = select_platform("acme")
    assert platform.name == "acme"
    assert platform.info.device_type == "cpu"
    assert platform.device_memory(0).total_bytes > 0
    from kvplane_acme.ops import silu_and_mul

    assert platform.ops.silu_and_mul is silu_and_mul
    # What Acme leaves out is served by the reference, and the fallback is logged.
    assert "kvplane_communicator" in caplog.text
    assert "rms_norm" in caplog.text
    spec = _spec()
    assert platform.attention_backend(spec).name == "acme"
    windowed = dataclasses.replace(spec, sliding_window=4)
    assert platform.attention_backend(windowed).name == "reference"


def _spec(**changes: Any) -> AttentionSpec:
    """The kit's small GQA spec with a head size Acme serves, and ``changes``."""
    return make_attention_spec(**{"head_size": 64, "scale": 64**-0.5, **changes})


@pytest.mark.parametrize(
    ("query_lens", "cached_lens"),
    [([5, 1, 1], [0, 9, 3]), ([3, 7], [6, 0]), ([1, 1, 1, 1], [1, 4, 8, 15])],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_matches_reference(
    query_lens: list[int], cached_lens: list[int], dtype: torch.dtype
) -> None:
    generator = torch.Generator().manual_seed(0)
    spec = _spec(dtype=dtype)
    # Sequences with ``cached_lens`` tokens already cached and ``query_lens`` new ones,
    # their blocks scattered at random in a cache whose other slots hold NaN: attention
    # that reads anything outside a sequence returns NaN.
    batch = make_paged_batch_for(spec, cached_lens, query_lens, generator)
    inputs = (batch.query, batch.key, batch.value)
    reference_cache, acme_cache = batch.kv_cache.clone(), batch.kv_cache.clone()

    expected = (
        ReferenceAttentionBackend()
        .make_impl(spec)
        .forward(*inputs, reference_cache, batch.metadata)
    )
    backend = AcmeAttentionBackend()
    assert backend.cannot_serve(spec) is None
    actual = backend.make_impl(spec).forward(*inputs, acme_cache, batch.metadata)

    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(actual, expected, atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(acme_cache, reference_cache, atol=0, rtol=0, equal_nan=True)


def test_attention_declines_what_it_cannot_serve() -> None:
    backend = AcmeAttentionBackend()
    assert "sliding_window" in (backend.cannot_serve(_spec(sliding_window=4)) or "")
    assert "logit_softcap" in (backend.cannot_serve(_spec(logit_softcap=30.0)) or "")
    assert "head_size" in (backend.cannot_serve(_spec(head_size=48)) or "")
