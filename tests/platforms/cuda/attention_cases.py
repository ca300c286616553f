"""Shared cases and checks of the CUDA platform's attention tests (not collected itself).

On the CPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, as
``scripts/test.sh`` sets) on small float32 shapes; on a GPU, without the interpreter,
every case runs on ``cuda`` too. Unused cache slots hold NaN (``poison`` in
:func:`kvplane.testing.helpers.make_paged_batch`), so any read outside a sequence's
context shows up as NaN in the output.
"""

from __future__ import annotations

import dataclasses

import torch

from kvplane.attention.metadata import AttentionMetadata
from kvplane.attention.reference import ReferenceAttentionBackend
from kvplane.plugins.types import AttentionSpec
from kvplane.testing.helpers import PagedBatch, batch_to, make_attention_spec
from kvplane_cuda.attention import TritonAttentionImpl
from kvplane_cuda.kernels.paged_attention import Tile

TOLERANCES = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 1e-2}


SPECS = {
    "gqa-d64-b16": make_attention_spec(block_size=16, head_size=64, num_heads=4, num_kv_heads=2),
    "mqa-d128-b32": make_attention_spec(block_size=32, head_size=128, num_heads=4, num_kv_heads=1),
    "mha-d256-b16": make_attention_spec(block_size=16, head_size=256, num_heads=2, num_kv_heads=2),
    "gqa3-d80-b16": make_attention_spec(block_size=16, head_size=80, num_heads=6, num_kv_heads=2),
    "window-b16": make_attention_spec(block_size=16, num_heads=4, num_kv_heads=2, sliding_window=7),
    "softcap-b32": make_attention_spec(
        block_size=32, num_heads=4, num_kv_heads=2, logit_softcap=2.0
    ),
    "window-softcap-b16": make_attention_spec(
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


def reference_with_cache(
    spec: AttentionSpec, batch: PagedBatch, device: str
) -> tuple[PagedBatch, torch.Tensor, torch.Tensor]:
    """``(batch on device, its cache with the new tokens written, reference output)``: the
    inputs of a kernel called directly, which does not write the cache itself."""
    on_device = batch_to(batch, torch.device(device))
    kv_cache = on_device.kv_cache.clone()
    expected = (
        ReferenceAttentionBackend()
        .make_impl(spec)
        .forward(on_device.query, on_device.key, on_device.value, kv_cache, on_device.metadata)
    )
    return on_device, kv_cache, expected


def decode_directly(
    spec: AttentionSpec,
    batch: PagedBatch,
    device: str,
    num_splits: int,
    fused_reduce: bool,
    tile: Tile | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(decode_attention output, reference output)``, the kernel called directly to pick
    its reduction (and tile). The output starts as NaN, so a row that
    no program writes shows."""
    from kvplane_cuda.kernels.decode_attention import decode_attention

    on_device, kv_cache, expected = reference_with_cache(spec, batch, device)
    metadata = on_device.metadata
    actual = torch.full_like(on_device.query, float("nan"))
    decode_attention(
        actual, on_device.query, kv_cache, metadata.block_tables, metadata.seq_lens,
        metadata.query_start_loc, metadata.max_seq_len, spec.scale, spec.sliding_window,
        spec.logit_softcap, num_splits, fused_reduce=fused_reduce, tile=tile,
    )  # fmt: skip
    return actual, expected


def unified_directly(
    spec: AttentionSpec, batch: PagedBatch, device: str, tile: Tile | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(unified_attention output, reference output)``, the kernel called directly to pick
    its tile; the output starts as NaN, as in :func:`decode_directly`."""
    from kvplane_cuda.kernels.paged_attention import unified_attention

    on_device, kv_cache, expected = reference_with_cache(spec, batch, device)
    metadata = on_device.metadata
    actual = torch.full_like(on_device.query, float("nan"))
    unified_attention(
        actual, on_device.query, kv_cache, metadata.block_tables, metadata.seq_lens,
        metadata.query_start_loc, metadata.max_query_len, spec.scale, spec.sliding_window,
        spec.logit_softcap, tile=tile,
    )  # fmt: skip
    return actual, expected


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
    return dataclasses.replace(
        batch,
        query=extend(batch.query),
        key=extend(batch.key),
        value=extend(batch.value),
        kv_cache=kv_cache,
        metadata=padded,
        context_lens=(*batch.context_lens, *[0] * num_padding),
        query_lens=(*batch.query_lens, *[1] * num_padding),
    )


def reshaped(batch: PagedBatch, num_blocks: int, width: int) -> PagedBatch:
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


def clone_batch(batch: PagedBatch) -> PagedBatch:
    metadata = batch.metadata
    cloned = dataclasses.replace(
        metadata,
        **{
            name: getattr(metadata, name).clone()
            for name in ("slot_mapping", "query_start_loc", "seq_lens", "block_tables")
        },
    )
    return dataclasses.replace(
        batch,
        query=batch.query.clone(),
        key=batch.key.clone(),
        value=batch.value.clone(),
        kv_cache=batch.kv_cache.clone(),
        metadata=cloned,
    )
