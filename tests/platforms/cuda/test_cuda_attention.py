"""The CUDA platform's Triton paged attention against the reference.

On the CPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, as
``scripts/test.sh`` sets) on small float32 shapes; on a GPU, without the interpreter,
every case runs on ``cuda`` too, plus bfloat16/float16 batches of realistic size and a
CUDA-graph replay. Unused cache slots hold NaN (``poison`` in
:func:`kvplane.testing.helpers.make_paged_batch`), so any read outside a sequence's
context shows up as NaN in the output.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kvplane.testing.helpers import (
    batch_to,
    make_attention_spec,
    make_paged_batch_for,
    random_lengths,
)
from kvplane_cuda.attention import TritonAttentionBackend, TritonAttentionImpl
from tests.platforms.cuda.attention_cases import (
    SPECS,
    assert_close_to_reference,
    assert_matches,
    pad_with_scratch_sequences,
    unified_directly,
)
from tests.platforms.cuda.devices import DEVICES, needs_gpu

pytest.importorskip("triton")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec_id", SPECS)
def test_mixed_batches_match_reference(
    device: str, spec_id: str, generator: torch.Generator
) -> None:
    """Prefill chunks with cached context and decodes together: the unified kernel."""
    spec = SPECS[spec_id]
    for _ in range(2):
        cached_lens, query_lens = random_lengths(generator, num_seqs=5, max_query=9, max_context=40)
        query_lens[0] = 9  # at least one prefill chunk, so the batch is mixed
        assert_matches(spec, make_paged_batch_for(spec, cached_lens, query_lens, generator), device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec_id", ["gqa-d64-b16", "gqa3-d80-b16", "window-softcap-b16"])
def test_prefill_batches_match_reference(
    device: str, spec_id: str, generator: torch.Generator
) -> None:
    spec = SPECS[spec_id]
    batch = make_paged_batch_for(spec, [0, 0, 0, 0], [21, 1, 40, 2], generator)
    assert_matches(spec, batch, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec_id", ["gqa-d64-b16", "window-softcap-b16"])
@pytest.mark.parametrize(
    ("block_m", "block_n", "num_warps", "num_stages"),
    [(128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 4, 4), (16, 16, 4, 3)],
)
def test_unified_tiles_match_reference(
    device: str,
    spec_id: str,
    block_m: int,
    block_n: int,
    num_warps: int,
    num_stages: int,
    generator: torch.Generator,
) -> None:
    """Every tile the benchmarks sweep, called directly: long chunks over cached context,
    each key tile's block ids loaded one iteration ahead."""
    from kvplane_cuda.kernels.paged_attention import Tile

    spec = SPECS[spec_id]
    batch = make_paged_batch_for(spec, [90, 130, 0], [70, 1, 33], generator)
    tile = Tile(block_m, block_n, num_warps, num_stages)
    actual, expected = unified_directly(spec, batch, device, tile)
    assert_close_to_reference(actual, expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("query_lens", "cached_lens"),
    [([0, 1, 0, 1], [0, 5, 12, 33]), ([0, 6, 0, 1, 0], [0, 0, 12, 33, 40]), ([0, 0], [0, 3])],
    ids=["decode", "mixed", "all-empty"],
)
def test_sequences_without_new_tokens(
    device: str, query_lens: list[int], cached_lens: list[int], generator: torch.Generator
) -> None:
    """Sequences of length 0, or with nothing new, produce no row and disturb nothing."""
    spec = SPECS["gqa-d64-b16"]
    batch = make_paged_batch_for(spec, cached_lens, query_lens, generator)
    for num_splits in (None, 4):
        assert_matches(spec, batch, device, num_splits)


@pytest.mark.parametrize("device", DEVICES)
def test_graph_padding_sequences(device: str, generator: torch.Generator) -> None:
    """Decode padding as the graph runner adds it: length 1 over a scratch block, slot -1."""
    spec = SPECS["gqa-d64-b16"]
    batch = pad_with_scratch_sequences(
        make_paged_batch_for(spec, [7, 60, 0], [1, 1, 1], generator), num_padding=3
    )
    for num_splits in (None, 3):
        assert_matches(spec, batch, device, num_splits)


@pytest.mark.parametrize("device", DEVICES)
def test_float16_matches_reference(device: str, generator: torch.Generator) -> None:
    spec = dataclasses.replace(SPECS["window-softcap-b16"], dtype=torch.float16)
    assert_matches(spec, make_paged_batch_for(spec, [5, 30, 63], [1, 1, 1], generator), device, 2)
    assert_matches(spec, make_paged_batch_for(spec, [5, 30, 0], [9, 1, 4], generator), device)


@pytest.mark.parametrize("device", DEVICES)
def test_float16_cache_under_float32_queries(device: str, generator: torch.Generator) -> None:
    spec = dataclasses.replace(SPECS["gqa-d64-b16"], kv_cache_dtype=torch.float16)
    assert_matches(spec, make_paged_batch_for(spec, [5, 30, 63], [1, 1, 1], generator), device, 2)
    assert_matches(spec, make_paged_batch_for(spec, [5, 30, 0], [9, 1, 4], generator), device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("query_lens", [[1, 1, 1, 1], [5, 1, 12, 1]], ids=["decode", "mixed"])
def test_forward_ignores_host_copies(
    device: str, query_lens: list[int], generator: torch.Generator
) -> None:
    """The host copies go stale on graph replay: wrong ones must change nothing."""
    spec = SPECS["window-b16"]
    batch = batch_to(make_paged_batch_for(spec, [3, 40, 17, 0], query_lens, generator), device)
    impl = TritonAttentionImpl(spec, num_splits=2)
    expected = impl.forward(
        batch.query, batch.key, batch.value, batch.kv_cache.clone(), batch.metadata
    )
    stale = dataclasses.replace(
        batch.metadata,
        query_start_loc_cpu=(0, 1, 2),
        seq_lens_cpu=(1000, 0),
    )
    actual = impl.forward(batch.query, batch.key, batch.value, batch.kv_cache.clone(), stale)
    torch.testing.assert_close(actual, expected, atol=0, rtol=0)


def test_cannot_serve_explains() -> None:
    backend = TritonAttentionBackend()
    assert backend.name == "cuda-triton" and backend.supports_graph_capture
    for spec in SPECS.values():
        assert backend.cannot_serve(spec) is None
    reasons = {
        "block_size 8 is not a power of two >= 16": make_attention_spec(block_size=8),
        "block_size 24 is not a power of two >= 16": make_attention_spec(block_size=24),
        "head_size 512 is larger than 256": make_attention_spec(block_size=16, head_size=512),
        "not a multiple": make_attention_spec(block_size=16, num_heads=7),
        "dtype torch.int8 is not float32": make_attention_spec(block_size=16, dtype=torch.int8),
        "kv_cache_dtype torch.float8_e5m2": make_attention_spec(
            block_size=16, kv_cache_dtype=torch.float8_e5m2
        ),
    }
    for reason, spec in reasons.items():
        assert reason in (backend.cannot_serve(spec) or ""), spec


def test_backend_builds_layers_with_its_decode_merge() -> None:
    for fused_reduce in (True, False):
        impl = TritonAttentionBackend(fused_reduce).make_impl(SPECS["gqa-d64-b16"])
        assert isinstance(impl, TritonAttentionImpl) and impl.fused_reduce is fused_reduce


# --------------------------------------------------------------------------------------
# GPU only: low precision at realistic shapes, CUDA graphs
# --------------------------------------------------------------------------------------


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_heads", [16, 32], ids=["qwen3-0.6b", "llama-3-8b"])
@pytest.mark.parametrize("kind", ["decode", "mixed"])
def test_realistic_low_precision(
    dtype: torch.dtype, num_heads: int, kind: str, generator: torch.Generator
) -> None:
    spec = make_attention_spec(
        block_size=16, num_heads=num_heads, num_kv_heads=8, head_size=128, dtype=dtype,
        scale=128**-0.5,
    )  # fmt: skip
    num_seqs = 32
    cached_lens = torch.randint(0, 4096, (num_seqs,), generator=generator).tolist()
    query_lens = [1] * num_seqs
    if kind == "mixed":
        query_lens[:4] = [256, 100, 37, 2]
    batch = make_paged_batch_for(spec, cached_lens, query_lens, generator)
    assert_matches(spec, batch, "cuda")
    if kind == "decode":
        assert_matches(spec, batch, "cuda", num_splits=7)
