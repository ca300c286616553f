"""Paged attention for CUDA with Triton kernels (:mod:`kvplane_cuda.kernels.paged_attention`).

Per layer and step: the new keys and values go into the cache with the
``reshape_and_cache`` kernel (:mod:`kvplane_cuda.kernels.cache`), then

- a batch with at most one new token per sequence (``max_query_len <= 1``) runs the
  split-KV decode kernel (context partitions spread over the SMs, then a reduce);
- any other batch (prefill chunks with cached context mixed with decodes) runs the
  unified kernel, one launch for the whole batch.

The forward reads only device tensors and the host ints ``max_query_len`` and
``max_seq_len`` (both may be upper bounds), never ``*_cpu`` metadata, and never syncs:
it can be captured in a CUDA graph. Sequences with no new token produce nothing; rows of
tokens that belong to no sequence are left undefined, as in the reference.

Triton is imported only when a layer is built (:meth:`TritonAttentionBackend.make_impl`),
so importing this module, as the plugin does, needs torch alone.

Bytes a decode step reads, for the benchmark's achieved bandwidth
(:func:`decode_bytes_read`): each sequence's visible keys and values,
``min(seq_len, sliding_window) * 2 * num_kv_heads * head_size * cache_element_size``,
plus its query row ``num_heads * head_size * element_size``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable

import torch

from kvplane.attention.backend import AttentionBackend, AttentionImpl
from kvplane.attention.metadata import AttentionMetadata
from kvplane.plugins.types import AttentionSpec

#: Dtypes the kernels load and multiply (``tl.dot`` operands).
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: Largest head size: the kernels pad it to a power of two and hold a tile of it per row.
MAX_HEAD_SIZE = 256
MIN_BLOCK_SIZE = 16


class TritonAttentionBackend(AttentionBackend):
    """Any GQA ratio, head size up to 256, power-of-two block sizes from 16, sliding
    window and logit soft-cap, in float32, float16 and bfloat16."""

    name = "cuda-triton"
    priority = 20
    supports_graph_capture = True

    def cannot_serve(self, spec: AttentionSpec) -> str | None:
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
        if spec.num_heads % spec.num_kv_heads != 0:
            return f"num_heads {spec.num_heads} not a multiple of {spec.num_kv_heads}"
        for what, dtype in (("dtype", spec.dtype), ("kv_cache_dtype", spec.kv_cache_dtype)):
            if dtype is not None and dtype not in KERNEL_DTYPES:
                return f"{what} {dtype} is not float32, float16 or bfloat16"
        block_size = spec.block_size
        if block_size < MIN_BLOCK_SIZE or block_size & (block_size - 1):
            return f"block_size {block_size} is not a power of two >= {MIN_BLOCK_SIZE}"
        if spec.head_size > MAX_HEAD_SIZE:
            return f"head_size {spec.head_size} is larger than {MAX_HEAD_SIZE}"
        return None

    def make_impl(self, spec: AttentionSpec) -> AttentionImpl:
        return TritonAttentionImpl(spec)


class TritonAttentionImpl(AttentionImpl):
    """One layer. ``num_splits`` forces the decode partition count and ``fused_reduce``
    where the partitions are merged (tests, benchmarks); ``None`` lets
    :mod:`~kvplane_cuda.kernels.decode_attention` choose."""

    def __init__(
        self,
        spec: AttentionSpec,
        num_splits: int | None = None,
        fused_reduce: bool | None = None,
    ) -> None:
        from kvplane_cuda.kernels import cache, decode_attention, paged_attention  # triton

        self.spec = spec
        self.num_splits = num_splits
        self.fused_reduce = fused_reduce
        self._write_kv_cache = cache.reshape_and_cache
        self._decode = decode_attention.decode_attention
        self._unified = paged_attention.unified_attention

    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_size]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_size]
        metadata: AttentionMetadata,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_size]
        self._write_kv_cache(key, value, kv_cache, metadata.slot_mapping)
        if query.stride(-1) != 1:
            query = query.contiguous()
        output = torch.empty(query.shape, dtype=query.dtype, device=query.device)
        if query.shape[0] == 0 or metadata.seq_lens.shape[0] == 0:
            return output
        spec = self.spec
        tensors = (
            output,
            query,
            kv_cache,
            metadata.block_tables,
            metadata.seq_lens,
            metadata.query_start_loc,
        )
        if metadata.max_query_len <= 1:
            self._decode(
                *tensors,
                metadata.max_seq_len,
                spec.scale,
                spec.sliding_window,
                spec.logit_softcap,
                self.num_splits,
                fused_reduce=self.fused_reduce,
            )
        else:
            self._unified(
                *tensors,
                metadata.max_query_len,
                spec.scale,
                spec.sliding_window,
                spec.logit_softcap,
            )
        return output


def decode_bytes_read(
    seq_lens: Iterable[int],
    num_heads: int,
    num_kv_heads: int,
    head_size: int,
    element_size: int,
    cache_element_size: int | None = None,
    sliding_window: int | None = None,
) -> int:
    """Bytes one decode step must read for a layer: every sequence's visible keys and
    values plus its query row (the minimum traffic, for achieved-bandwidth figures)."""
    kv_per_token = 2 * num_kv_heads * head_size * (cache_element_size or element_size)
    total = 0
    for seq_len in seq_lens:
        visible = seq_len if sliding_window is None else min(seq_len, sliding_window)
        total += visible * kv_per_token + num_heads * head_size * element_size
    return total
