"""Acme's own tests: probe, selection, and attention against kvplane's reference.

Run from this folder with ``pytest`` (the package installed, e.g. ``pip install -e .``);
kvplane's conformance kit runs separately with
``pytest --pyargs kvplane.testing --kvplane-platform acme``.
"""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from kvplane.attention.metadata import AttentionMetadata
from kvplane.attention.reference import ReferenceAttentionBackend
from kvplane.plugins import PlatformSelectionError, discovery, register_platform, select_platform
from kvplane.plugins.types import AttentionSpec
from kvplane_acme import plugin
from kvplane_acme.attention import AcmeAttentionBackend


@pytest.fixture(autouse=True)
def acme_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``acme`` discoverable even when the package is not pip-installed."""
    monkeypatch.setattr(discovery, "_registered", dict(discovery._registered))
    register_platform("acme", plugin)


def test_probe_available_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(plugin.AVAILABLE_ENV, raising=False)
    result = plugin.kvplane_platform_probe()
    assert result.available
    assert result.score == plugin.PROBE_SCORE


def test_probe_unavailable_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(plugin.AVAILABLE_ENV, "0")
    result = plugin.kvplane_platform_probe()
    assert not result.available
    assert plugin.AVAILABLE_ENV in result.reason
    with pytest.raises(PlatformSelectionError, match="Acme driver not found"):
        select_platform("acme")


def test_select_acme_resolves_hooks_with_reference_fallbacks(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv(plugin.AVAILABLE_ENV, raising=False)
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


def _spec(**changes: object) -> AttentionSpec:
    base = AttentionSpec(
        num_heads=8,
        num_kv_heads=2,
        head_size=64,
        dtype=torch.float32,
        block_size=4,
        scale=64**-0.5,
    )
    return dataclasses.replace(base, **changes)


def _random_batch(
    generator: torch.Generator,
    spec: AttentionSpec,
    query_lens: list[int],
    cached_lens: list[int],
) -> tuple[AttentionMetadata, int]:
    """Sequences with ``cached_lens`` tokens already cached and ``query_lens`` new ones,
    their blocks scattered at random in the cache."""
    seq_lens = [q + c for q, c in zip(query_lens, cached_lens, strict=True)]
    blocks_per_seq = [-(-n // spec.block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 2
    free_blocks = torch.randperm(num_blocks, generator=generator).tolist()
    tables, slots = [], []
    for seq_len, query_len, num in zip(seq_lens, query_lens, blocks_per_seq, strict=True):
        table = [free_blocks.pop() for _ in range(num)]
        tables.append(table + [0] * (max(blocks_per_seq) - num))
        for pos in range(seq_len - query_len, seq_len):
            slots.append(table[pos // spec.block_size] * spec.block_size + pos % spec.block_size)
    starts = [0]
    for query_len in query_lens:
        starts.append(starts[-1] + query_len)
    metadata = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=torch.tensor(tables, dtype=torch.int32),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        query_start_loc_cpu=tuple(starts),
        seq_lens_cpu=tuple(seq_lens),
    )
    return metadata, num_blocks


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
    metadata, num_blocks = _random_batch(generator, spec, query_lens, cached_lens)
    num_tokens = sum(query_lens)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(dtype)

    query = randn(num_tokens, spec.num_heads, spec.head_size)
    key = randn(num_tokens, spec.num_kv_heads, spec.head_size)
    value = randn(num_tokens, spec.num_kv_heads, spec.head_size)
    cache = randn(2, num_blocks, spec.block_size, spec.num_kv_heads, spec.head_size)
    reference_cache, acme_cache = cache.clone(), cache.clone()

    expected = (
        ReferenceAttentionBackend()
        .make_impl(spec)
        .forward(query, key, value, reference_cache, metadata)
    )
    backend = AcmeAttentionBackend()
    assert backend.cannot_serve(spec) is None
    actual = backend.make_impl(spec).forward(query, key, value, acme_cache, metadata)

    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(actual, expected, atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(acme_cache, reference_cache, atol=0, rtol=0)


def test_attention_declines_what_it_cannot_serve() -> None:
    backend = AcmeAttentionBackend()
    assert "sliding_window" in (backend.cannot_serve(_spec(sliding_window=4)) or "")
    assert "logit_softcap" in (backend.cannot_serve(_spec(logit_softcap=30.0)) or "")
    assert "head_size" in (backend.cannot_serve(_spec(head_size=48)) or "")
