"""The CUDA platform's Triton paged attention against the reference.

On the CPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, as
``scripts/test.sh`` sets) on small float32 shapes; on a GPU, without the interpreter,
every case runs on ``cuda`` too, plus bfloat16/float16 batches of realistic size and a
CUDA-graph replay. Unused cache slots hold NaN (see :mod:`tests.platforms.paged_batches`),
so any read outside a sequence's context shows up as NaN in the output.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from kvplane.attention.metadata import AttentionMetadata
from kvplane.attention.reference import ReferenceAttentionBackend
from kvplane.plugins.types import AttentionSpec
from kvplane_cuda.attention import TritonAttentionBackend, TritonAttentionImpl, decode_bytes_read
from tests.platforms.paged_batches import (
    PagedBatch,
    batch_to,
    make_paged_batch,
    make_spec,
    random_lengths,
)

pytest.importorskip("triton")

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_GPU = torch.cuda.is_available() and not INTERPRET
# The interpreter runs CPU tensors; real kernels need a GPU (and no interpreter).
DEVICES = (["cpu"] if INTERPRET else []) + (["cuda"] if HAS_GPU else [])
TOLERANCES = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 1e-2}
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device, not the interpreter")

SPECS = {
    "gqa-d64-b16": make_spec(block_size=16, head_size=64, num_heads=4, num_kv_heads=2),
    "mqa-d128-b32": make_spec(block_size=32, head_size=128, num_heads=4, num_kv_heads=1),
    "mha-d256-b16": make_spec(block_size=16, head_size=256, num_heads=2, num_kv_heads=2),
    "gqa3-d80-b16": make_spec(block_size=16, head_size=80, num_heads=6, num_kv_heads=2),
    "window-b16": make_spec(block_size=16, num_heads=4, num_kv_heads=2, sliding_window=7),
    "softcap-b32": make_spec(block_size=32, num_heads=4, num_kv_heads=2, logit_softcap=2.0),
    "window-softcap-b16": make_spec(
        block_size=16, num_heads=4, num_kv_heads=1, sliding_window=20, logit_softcap=5.0
    ),
}


def run_both(
    spec: AttentionSpec, batch: PagedBatch, device: str, num_splits: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(triton output, reference output)`` on ``device``; caches compared exactly."""
    on_device = batch_to(batch, torch.device(device))
    reference_cache = on_device.kv_cache.clone()
    expected = (
        ReferenceAttentionBackend()
        .make_impl(spec)
        .forward(
            on_device.query, on_device.key, on_device.value, reference_cache, on_device.metadata
        )
    )
    actual = TritonAttentionImpl(spec, num_splits).forward(
        on_device.query, on_device.key, on_device.value, on_device.kv_cache, on_device.metadata
    )
    assert actual.device.type == device and actual.dtype == batch.query.dtype
    torch.testing.assert_close(on_device.kv_cache, reference_cache, atol=0, rtol=0, equal_nan=True)
    return actual, expected


def assert_matches(
    spec: AttentionSpec, batch: PagedBatch, device: str, num_splits: int | None = None
) -> None:
    assert_close_to_reference(*run_both(spec, batch, device, num_splits))


def assert_close_to_reference(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert not actual.isnan().any(), "the kernel read a slot it must not read (or wrote no row)"
    tolerance = TOLERANCES[actual.dtype]
    torch.testing.assert_close(actual, expected, atol=tolerance, rtol=tolerance)


def decode_directly(
    spec: AttentionSpec,
    batch: PagedBatch,
    device: str,
    num_splits: int,
    fused_reduce: bool | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(decode_attention output, reference output)``, the kernel called directly to pick
    its reduction. The output starts as NaN, so a row that no program writes shows."""
    from kvplane_cuda.kernels.decode_attention import decode_attention

    on_device = batch_to(batch, torch.device(device))
    metadata = on_device.metadata
    kv_cache = on_device.kv_cache.clone()  # the reference writes the new tokens into it
    expected = (
        ReferenceAttentionBackend()
        .make_impl(spec)
        .forward(on_device.query, on_device.key, on_device.value, kv_cache, metadata)
    )
    actual = torch.full_like(on_device.query, float("nan"))
    decode_attention(
        actual, on_device.query, kv_cache, metadata.block_tables, metadata.seq_lens,
        metadata.query_start_loc, metadata.max_seq_len, spec.scale, spec.sliding_window,
        spec.logit_softcap, num_splits, fused_reduce=fused_reduce,
    )  # fmt: skip
    return actual, expected


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
@pytest.mark.parametrize("spec_id", SPECS)
@pytest.mark.parametrize("num_splits", [None, 1, 3, 8, 128])
def test_decode_batches_match_reference(
    device: str, spec_id: str, num_splits: int | None, generator: torch.Generator
) -> None:
    """One new token per sequence: split-KV decode, with partitions that are empty for the
    shorter contexts (8 splits over at most a few key tiles)."""
    spec = SPECS[spec_id]
    cached_lens = [0, 3, 16, 47, 95]
    batch = make_paged_batch(spec, [1] * len(cached_lens), cached_lens, generator)
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
    batch = make_paged_batch(spec, [1, 0, 1, 1, 1], [0, 9, 16, 47, 95], generator)
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
    first = make_paged_batch(spec, [1, 0, 1], [40, 12, 5], generator)
    second = make_paged_batch(spec, [1, 1, 0, 1], [3, 90, 0, 33], generator)
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
        batch = make_paged_batch(spec, [1] * num_seqs, cached_lens, generator)
        assert_close_to_reference(*decode_directly(spec, batch, device, 3, fused_reduce=True))
    counters = kernels.split_counters(torch.device(device), 14)
    assert counters.numel() == 16 and not counters.any()
    assert [c.numel() for c in kernels._retired_counters] == [4]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec_id", ["gqa-d64-b16", "gqa3-d80-b16", "window-softcap-b16"])
def test_prefill_batches_match_reference(
    device: str, spec_id: str, generator: torch.Generator
) -> None:
    spec = SPECS[spec_id]
    batch = make_paged_batch(spec, [21, 1, 40, 2], [0, 0, 0, 0], generator)
    assert_matches(spec, batch, device)


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


def test_num_splits_fill_the_gpu_only_when_needed() -> None:
    from kvplane_cuda.kernels.decode_attention import choose_num_splits

    # H100: 132 SMs; 8 KV heads (Qwen3-0.6B, Llama-3-8B).
    assert choose_num_splits(1, 8, 8192, 132) == 32  # 256 programs of 256 keys
    assert choose_num_splits(32, 8, 8192, 132) == 9
    assert choose_num_splits(128, 8, 8192, 132) == 3
    assert choose_num_splits(1024, 8, 8192, 132) == 1
    assert choose_num_splits(1, 8, 300, 132) == 2  # never shorter than 256 keys
    assert choose_num_splits(1, 8, 40960, 132) == 64  # capped; an upper bound is fine


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


@needs_gpu
def test_decode_replays_in_a_cuda_graph(generator: torch.Generator) -> None:
    """Captured once with upper bounds, replayed on other lengths written in place."""
    spec = make_spec(block_size=16, num_heads=16, num_kv_heads=8, head_size=128)
    spec = dataclasses.replace(spec, dtype=torch.bfloat16, scale=128**-0.5)
    first = make_paged_batch(spec, [1] * 8, [100, 0, 3000, 7, 64, 900, 15, 2048], generator)
    second = make_paged_batch(spec, [1] * 8, [4000, 31, 0, 1200, 16, 5, 333, 80], generator)
    num_blocks = max(b.kv_cache.shape[1] for b in (first, second))
    width = max(b.metadata.block_tables.shape[1] for b in (first, second))
    first, second = (batch_to(_reshaped(b, num_blocks, width), "cuda") for b in (first, second))
    static = _clone(first)
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
    batch = batch_to(make_paged_batch(spec, [1, 1, 1], [40, 7, 90], generator), "cuda")
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


def pad_with_scratch_sequences(batch: PagedBatch, num_padding: int) -> PagedBatch:
    """Append ``num_padding`` sequences of length 1 whose block-table rows all point at a
    new zeroed scratch block and whose token is not written (slot -1)."""
    metadata = batch.metadata
    kv_cache = torch.cat([batch.kv_cache, torch.zeros_like(batch.kv_cache[:, :1])], dim=1)
    scratch = kv_cache.shape[1] - 1
    width = metadata.block_tables.shape[1]
    tables = torch.cat(
        [metadata.block_tables, torch.full((num_padding, width), scratch, dtype=torch.int32)]
    )
    num_tokens = metadata.query_start_loc_cpu[-1]
    starts = (*metadata.query_start_loc_cpu, *range(num_tokens + 1, num_tokens + 1 + num_padding))
    seq_lens = (*metadata.seq_lens_cpu, *[1] * num_padding)

    def extend(tensor: torch.Tensor) -> torch.Tensor:  # [num_tokens, heads, head_size]
        return torch.cat([tensor, tensor.new_ones(num_padding, *tensor.shape[1:])])

    padded = AttentionMetadata(
        slot_mapping=torch.cat([metadata.slot_mapping, torch.full((num_padding,), -1)]),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=tables,
        max_query_len=max(1, metadata.max_query_len),
        max_seq_len=metadata.max_seq_len,
        query_start_loc_cpu=starts,
        seq_lens_cpu=seq_lens,
    )
    return PagedBatch(padded, extend(batch.query), extend(batch.key), extend(batch.value), kv_cache)


def _reshaped(batch: PagedBatch, num_blocks: int, width: int) -> PagedBatch:
    """The same batch over a cache of ``num_blocks`` and block tables ``width`` wide (the
    added blocks hold NaN, the added table entries point at block 0: never read)."""
    cache = batch.kv_cache
    extra = torch.full_like(cache[:, :1], float("nan")).expand(
        -1, num_blocks - cache.shape[1], -1, -1, -1
    )
    tables = batch.metadata.block_tables
    tables = torch.cat([tables, tables.new_zeros(tables.shape[0], width - tables.shape[1])], 1)
    metadata = dataclasses.replace(batch.metadata, block_tables=tables)
    return dataclasses.replace(batch, metadata=metadata, kv_cache=torch.cat([cache, extra], 1))


def _clone(batch: PagedBatch) -> PagedBatch:
    metadata = batch.metadata
    cloned = dataclasses.replace(
        metadata,
        **{
            name: getattr(metadata, name).clone()
            for name in ("slot_mapping", "query_start_loc", "seq_lens", "block_tables")
        },
    )
    return PagedBatch(
        cloned,
        batch.query.clone(),
        batch.key.clone(),
        batch.value.clone(),
        batch.kv_cache.clone(),
    )
