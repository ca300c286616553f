"""The CUDA platform's split-KV decode attention against the reference: split counts, the
merge of the partitions (in the split kernel or a second launch), its arrival counters,
and CUDA-graph replay.

On the CPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, as
``scripts/test.sh`` sets) on small float32 shapes; on a GPU, without the interpreter,
every case runs on ``cuda`` too, plus CUDA-graph replays. Unused cache slots hold NaN
(see :func:`kvplane.testing.helpers.make_paged_batch`), so any read outside a sequence's context
shows up as NaN in the output.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kvplane.attention.reference import ReferenceAttentionBackend
from kvplane.testing.helpers import batch_to, make_attention_spec, make_paged_batch_for
from kvplane_cuda.attention import TritonAttentionImpl
from tests.platforms.cuda.attention_cases import (
    SPECS,
    assert_close_to_reference,
    assert_matches,
    clone_batch,
    decode_directly,
    reshaped,
)
from tests.platforms.cuda.devices import DEVICES, needs_gpu

pytest.importorskip("triton")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec_id", SPECS)
@pytest.mark.parametrize("num_splits", [None, 1, 3, 8, 32])
def test_decode_batches_match_reference(
    device: str, spec_id: str, num_splits: int | None, generator: torch.Generator
) -> None:
    """One new token per sequence: split-KV decode, with partitions that are empty for the
    shorter contexts (8 and 32 splits over at most six key tiles)."""
    spec = SPECS[spec_id]
    cached_lens = [0, 3, 16, 47, 95]
    batch = make_paged_batch_for(spec, cached_lens, [1] * len(cached_lens), generator)
    assert_matches(spec, batch, device, num_splits)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec_id", ["gqa-d64-b16", "gqa3-d80-b16", "window-softcap-b16"])
@pytest.mark.parametrize("num_splits", [3, 8])
def test_fused_and_separate_reductions_agree(
    device: str, spec_id: str, num_splits: int, generator: torch.Generator
) -> None:
    """The merge in the split kernel (the last program of a group reduces) and the
    separate reduce kernel, on the same inputs: a sequence without a new token, one
    without context, and empty partitions."""
    spec = SPECS[spec_id]
    batch = make_paged_batch_for(spec, [0, 9, 16, 47, 95], [1, 0, 1, 1, 1], generator)
    outputs = []
    for fused_reduce in (True, False):
        actual, expected = decode_directly(spec, batch, device, num_splits, fused_reduce)
        assert_close_to_reference(actual, expected)
        outputs.append(actual)
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_reduce_leaves_its_counters_at_zero(device: str, generator: torch.Generator) -> None:
    """Launches in a row: the merging program resets its group's counter (else the next
    launch would elect no merger and leave NaN rows), and a sequence without a new
    token never touches its counter."""
    from kvplane_cuda.kernels.decode_attention import split_counters

    spec = SPECS["window-softcap-b16"]
    first = make_paged_batch_for(spec, [40, 12, 5], [1, 0, 1], generator)
    second = make_paged_batch_for(spec, [3, 90, 0, 33], [1, 1, 0, 1], generator)
    for batch in (first, first, second):
        assert_close_to_reference(*decode_directly(spec, batch, device, 4, fused_reduce=True))
        assert not split_counters(torch.device(device), 1).any()


@pytest.mark.parametrize("device", DEVICES)
def test_fused_reduce_grows_its_counters(
    device: str, generator: torch.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More (sequence, KV head) groups than counters: a larger zeroed buffer replaces the
    buffer, which stays allocated (captured graphs may still replay on it)."""
    from kvplane_cuda.kernels import decode_attention as kernels

    monkeypatch.setattr(kernels, "COUNTER_SLOTS", 4)
    monkeypatch.setattr(kernels, "_counters", {})
    monkeypatch.setattr(kernels, "_retired_counters", [])
    spec = SPECS["gqa-d64-b16"]  # 2 KV heads
    for num_seqs in (2, 7):  # 4 groups: the initial buffer; then 14
        cached_lens = torch.randint(0, 80, (num_seqs,), generator=generator).tolist()
        batch = make_paged_batch_for(spec, cached_lens, [1] * num_seqs, generator)
        assert_close_to_reference(*decode_directly(spec, batch, device, 3, fused_reduce=True))
    counters = kernels.split_counters(torch.device(device), 14)
    assert counters.numel() == 16 and not counters.any()
    assert [c.numel() for c in kernels._retired_counters] == [4]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec_id", ["gqa-d64-b16", "window-softcap-b16"])
@pytest.mark.parametrize(
    ("block_n", "num_warps", "num_stages"),
    [(64, 4, 2), (64, 4, 3), (64, 4, 4), (32, 4, 3), (32, 4, 5), (16, 8, 2)],
)
def test_decode_tiles_match_reference(
    device: str,
    spec_id: str,
    block_n: int,
    num_warps: int,
    num_stages: int,
    generator: torch.Generator,
) -> None:
    """Every tile the benchmarks sweep: partitions of many key tiles, each tile's block
    ids loaded one iteration ahead (the last partition's run past its end), and the
    pipeline stages that keep more tiles in flight."""
    from kvplane_cuda.kernels.paged_attention import Tile

    spec = SPECS[spec_id]
    batch = make_paged_batch_for(spec, [0, 70, 201, 333], [1] * 4, generator)
    tile = Tile(16, block_n, num_warps, num_stages)
    for num_splits in (1, 3):
        actual, expected = decode_directly(spec, batch, device, num_splits, True, tile)
        assert_close_to_reference(actual, expected)


def test_num_splits_fill_the_gpu_only_when_needed() -> None:
    from kvplane_cuda.kernels.decode_attention import choose_num_splits

    # H100: 132 SMs; 8 KV heads (Qwen3-0.6B, Llama-3-8B).
    assert choose_num_splits(1, 8, 8192, 132) == 32  # 256 programs of 256 keys
    assert choose_num_splits(32, 8, 8192, 132) == 9
    assert choose_num_splits(128, 8, 8192, 132) == 3
    assert choose_num_splits(1024, 8, 8192, 132) == 1
    assert choose_num_splits(1, 8, 1024, 132) == 16  # never shorter than one 64-key tile
    assert choose_num_splits(1, 8, 100, 132) == 2
    assert choose_num_splits(1, 8, 40960, 132) == 32  # capped; an upper bound is fine


@needs_gpu
def test_decode_replays_in_a_cuda_graph(generator: torch.Generator) -> None:
    """Captured once with upper bounds, replayed on other lengths written in place."""
    spec = make_attention_spec(block_size=16, num_heads=16, num_kv_heads=8, head_size=128)
    spec = dataclasses.replace(spec, dtype=torch.bfloat16, scale=128**-0.5)
    first = make_paged_batch_for(spec, [100, 0, 3000, 7, 64, 900, 15, 2048], [1] * 8, generator)
    second = make_paged_batch_for(spec, [4000, 31, 0, 1200, 16, 5, 333, 80], [1] * 8, generator)
    num_blocks = max(b.kv_cache.shape[1] for b in (first, second))
    width = max(b.metadata.block_tables.shape[1] for b in (first, second))
    first, second = (batch_to(reshaped(b, num_blocks, width), "cuda") for b in (first, second))
    static = clone_batch(first)
    upper_bound = dataclasses.replace(static.metadata, max_seq_len=8192)
    impl = TritonAttentionImpl(spec)
    impl.forward(static.query, static.key, static.value, static.kv_cache.clone(), upper_bound)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = impl.forward(static.query, static.key, static.value, static.kv_cache, upper_bound)
    for batch in (second, first):
        for name in ("slot_mapping", "query_start_loc", "seq_lens", "block_tables"):
            getattr(static.metadata, name).copy_(getattr(batch.metadata, name))
        for name in ("query", "key", "value", "kv_cache"):
            getattr(static, name).copy_(getattr(batch, name))
        graph.replay()
        reference_cache = batch.kv_cache.clone()
        expected = (
            ReferenceAttentionBackend()
            .make_impl(spec)
            .forward(batch.query, batch.key, batch.value, reference_cache, batch.metadata)
        )
        torch.testing.assert_close(output, expected, atol=3e-2, rtol=3e-2)
        torch.testing.assert_close(static.kv_cache, reference_cache, equal_nan=True)


@needs_gpu
def test_capture_without_counters_reduces_separately(
    generator: torch.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A capture that would have to allocate the counters (whose zeroing would not be
    replayed before the first use) merges in the separate reduce kernel instead."""
    from kvplane_cuda.kernels import decode_attention as kernels

    monkeypatch.setattr(kernels, "_counters", {})
    spec = SPECS["gqa-d64-b16"]
    batch = batch_to(make_paged_batch_for(spec, [40, 7, 90], [1, 1, 1], generator), "cuda")
    metadata = batch.metadata
    kv_cache = batch.kv_cache.clone()
    expected = (
        ReferenceAttentionBackend()
        .make_impl(spec)
        .forward(batch.query, batch.key, batch.value, kv_cache, metadata)
    )
    output = torch.empty_like(batch.query)
    arguments = (
        output, batch.query, kv_cache, metadata.block_tables, metadata.seq_lens,
        metadata.query_start_loc, metadata.max_seq_len, spec.scale, None, None, 4,
    )  # fmt: skip
    kernels.decode_attention(*arguments, fused_reduce=False)  # compiles outside the capture
    output.fill_(float("nan"))
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kernels.decode_attention(*arguments)
    assert not kernels._counters
    graph.replay()
    torch.cuda.synchronize()
    assert_close_to_reference(output, expected)


# --------------------------------------------------------------------------------------
# Batch surgery
# --------------------------------------------------------------------------------------
