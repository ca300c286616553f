"""The CUDA platform's Triton paged attention against the reference.

On the CPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, as
``scripts/test.sh`` sets) on small float32 shapes; on a GPU, without the interpreter,
every case runs on ``cuda`` too, plus bfloat16/float16 batches of realistic size and a
CUDA-graph replay. Unused cache slots hold NaN (see :mod:`tests.platforms.paged_batches`),
so any read outside a sequence's context shows up as NaN in the output.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kvplane_cuda.attention import TritonAttentionBackend, TritonAttentionImpl, decode_bytes_read
from tests.platforms.cuda.attention_cases import (
    SPECS,
    assert_close_to_reference,
    assert_matches,
    pad_with_scratch_sequences,
    unified_directly,
)
from tests.platforms.cuda.devices import DEVICES, needs_gpu
from tests.platforms.paged_batches import (
    batch_to,
    make_paged_batch,
    make_spec,
    random_lengths,
)

pytest.importorskip("triton")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec_id", SPECS)
def test_mixed_batches_match_reference(
    device: str, spec_id: str, generator: torch.Generator
) -> None:
    """Prefill chunks with cached context and decodes together: the unified kernel."""
    spec = SPECS[spec_id]
    for _ in range(2):
        query_lens, cached_lens = random_lengths(generator, num_seqs=5, max_query=9, max_cached=40)
        query_lens[0] = 9  # at least one prefill chunk, so the batch is mixed
        assert_matches(spec, make_paged_batch(spec, query_lens, cached_lens, generator), device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec_id", ["gqa-d64-b16", "gqa3-d80-b16", "window-softcap-b16"])
def test_prefill_batches_match_reference(
    device: str, spec_id: str, generator: torch.Generator
) -> None:
    spec = SPECS[spec_id]
    batch = make_paged_batch(spec, [21, 1, 40, 2], [0, 0, 0, 0], generator)
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
    batch = make_paged_batch(spec, [70, 1, 33], [90, 130, 0], generator)
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
    batch = make_paged_batch(spec, query_lens, cached_lens, generator)
    for num_splits in (None, 4):
        assert_matches(spec, batch, device, num_splits)


@pytest.mark.parametrize("device", DEVICES)
def test_graph_padding_sequences(device: str, generator: torch.Generator) -> None:
    """Decode padding as the graph runner adds it: length 1 over a scratch block, slot -1."""
    spec = SPECS["gqa-d64-b16"]
    batch = pad_with_scratch_sequences(
        make_paged_batch(spec, [1, 1, 1], [7, 60, 0], generator), num_padding=3
    )
    for num_splits in (None, 3):
        assert_matches(spec, batch, device, num_splits)


@pytest.mark.parametrize("device", DEVICES)
def test_float16_matches_reference(device: str, generator: torch.Generator) -> None:
    spec = dataclasses.replace(SPECS["window-softcap-b16"], dtype=torch.float16)
    assert_matches(spec, make_paged_batch(spec, [1, 1, 1], [5, 30, 63], generator), device, 2)
    assert_matches(spec, make_paged_batch(spec, [9, 1, 4], [5, 30, 0], generator), device)


@pytest.mark.parametrize("device", DEVICES)
def test_float16_cache_under_float32_queries(device: str, generator: torch.Generator) -> None:
    spec = dataclasses.replace(SPECS["gqa-d64-b16"], kv_cache_dtype=torch.float16)
    assert_matches(spec, make_paged_batch(spec, [1, 1, 1], [5, 30, 63], generator), device, 2)
    assert_matches(spec, make_paged_batch(spec, [9, 1, 4], [5, 30, 0], generator), device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("query_lens", [[1, 1, 1, 1], [5, 1, 12, 1]], ids=["decode", "mixed"])
def test_forward_ignores_host_copies(
    device: str, query_lens: list[int], generator: torch.Generator
) -> None:
    """The host copies go stale on graph replay: wrong ones must change nothing."""
    spec = SPECS["window-b16"]
    batch = batch_to(make_paged_batch(spec, query_lens, [3, 40, 17, 0], generator), device)
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
        "block_size 8 is not a power of two >= 16": make_spec(block_size=8),
        "block_size 24 is not a power of two >= 16": make_spec(block_size=24),
        "head_size 512 is larger than 256": make_spec(block_size=16, head_size=512),
        "not a multiple": make_spec(block_size=16, num_heads=7),
        "dtype torch.int8 is not float32": make_spec(block_size=16, dtype=torch.int8),
        "kv_cache_dtype torch.float8_e4m3fn": make_spec(
            block_size=16, kv_cache_dtype=torch.float8_e4m3fn
        ),
    }
    for reason, spec in reasons.items():
        assert reason in (backend.cannot_serve(spec) or ""), spec


def test_decode_bytes_read() -> None:
    # Qwen3-0.6B shapes, bf16: 8 KV heads x 128 x 2 bytes, keys and values.
    assert decode_bytes_read([8192], 16, 8, 128, 2) == 8192 * 4096 + 16 * 128 * 2
    assert decode_bytes_read([10, 100], 4, 2, 64, 4, sliding_window=50) == (
        (10 + 50) * 2 * 2 * 64 * 4 + 2 * 4 * 64 * 4
    )


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
    spec = make_spec(
        block_size=16, num_heads=num_heads, num_kv_heads=8, head_size=128, dtype=dtype,
        scale=128**-0.5,
    )  # fmt: skip
    num_seqs = 32
    cached_lens = torch.randint(0, 4096, (num_seqs,), generator=generator).tolist()
    query_lens = [1] * num_seqs
    if kind == "mixed":
        query_lens[:4] = [256, 100, 37, 2]
    batch = make_paged_batch(spec, query_lens, cached_lens, generator)
    assert_matches(spec, batch, "cuda")
    if kind == "decode":
        assert_matches(spec, batch, "cuda", num_splits=7)
