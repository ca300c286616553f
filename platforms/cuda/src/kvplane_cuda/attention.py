"""Paged attention for CUDA with Triton kernels (:mod:`kvplane_cuda.kernels.paged_attention`).

Per layer and step: the new keys and values go into the cache with the
``reshape_and_cache`` kernel (:mod:`kvplane_cuda.kernels.cache`), then

- a batch with at most one new token per sequence (``max_query_len <= 1``) runs the
  split-KV decode kernel (context partitions spread over the SMs, merged in the same
  launch unless the backend was built with ``fused_reduce=False``);
- any other batch (prefill chunks with cached context mixed with decodes) runs the
  unified kernel, one launch for the whole batch.

The forward reads only device tensors and the host ints ``max_query_len`` and
``max_seq_len`` (both may be upper bounds), never ``*_cpu`` metadata, and never syncs:
it can be captured in a CUDA graph. An FP8 (float8_e4m3fn) cache is written quantized
and read as stored, its per-layer scales folded into the kernels' float32 arithmetic
(:mod:`kvplane_cuda.kernels.paged_attention`); it needs e4m3 in Triton, so compute
capability 8.9 (Ada, Hopper) or newer. Sequences with no new token produce nothing; rows of
tokens that belong to no sequence are left undefined, as in the reference.

Triton is imported only when a layer is built (:meth:`TritonAttentionBackend.make_impl`),
so importing this module, as the plugin does, needs torch alone.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from kvplane.attention.backend import AttentionBackend, AttentionImpl
from kvplane.attention.metadata import AttentionMetadata
from kvplane.plugins.types import AttentionSpec

#: Dtypes the kernels load and multiply (``tl.dot`` operands).
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: Quantized cache dtypes the kernels read (dequantized with per-layer scales).
FP8_KV_CACHE_DTYPES = (torch.float8_e4m3fn,)
#: Triton has e4m3 (``fp8e4nv``) from this compute capability on (Ada, Hopper).
MIN_FP8_CAPABILITY = (8, 9)
#: Largest head size: the kernels pad it to a power of two and hold a tile of it per row.
MAX_HEAD_SIZE = 256
MIN_BLOCK_SIZE = 16


class TritonAttentionBackend(AttentionBackend):
    """Any GQA ratio, head size up to 256, power-of-two block sizes from 16, sliding
    window and logit soft-cap, in float32, float16 and bfloat16, over a cache of those
    or of float8_e4m3fn (on compute capability 8.9 and newer).

    ``fused_reduce=False`` builds layers whose split-KV decode merges its partitions in a
    second launch (benchmarks compare it with the default, merged in the split kernel).
    """

    name = "cuda-triton"
    priority = 20
    supports_graph_capture = True
    supports_fp8_kv_cache = True

    def __init__(self, fused_reduce: bool = True) -> None:
        self.fused_reduce = fused_reduce

    def cannot_serve(self, spec: AttentionSpec) -> str | None:
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
        if (reason := super().cannot_serve(spec)) is not None:
            return reason
        if spec.dtype not in KERNEL_DTYPES:
            return f"dtype {spec.dtype} is not float32, float16 or bfloat16"
        kv_cache_dtype = spec.kv_cache_dtype
        if kv_cache_dtype in FP8_KV_CACHE_DTYPES:
            if (reason := fp8_unsupported_reason()) is not None:
                return reason
        elif kv_cache_dtype is not None and kv_cache_dtype not in KERNEL_DTYPES:
            return (
                f"kv_cache_dtype {kv_cache_dtype} is not float32, float16, bfloat16 or "
                "float8_e4m3fn"
            )
        block_size = spec.block_size
        if block_size < MIN_BLOCK_SIZE or block_size & (block_size - 1):
            return f"block_size {block_size} is not a power of two >= {MIN_BLOCK_SIZE}"
        if spec.head_size > MAX_HEAD_SIZE:
            return f"head_size {spec.head_size} is larger than {MAX_HEAD_SIZE}"
        return None

    def make_impl(self, spec: AttentionSpec) -> AttentionImpl:
        return TritonAttentionImpl(spec, fused_reduce=self.fused_reduce)


def fp8_unsupported_reason() -> str | None:
    """Why this process's GPU cannot run the kernels over an FP8 cache, or ``None``
    (always ``None`` in Triton's interpreter, which has no target)."""
    if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available():
        return None
    capability = torch.cuda.get_device_capability()
    if capability < MIN_FP8_CAPABILITY:
        return (
            "kv_cache_dtype torch.float8_e4m3fn needs compute capability "
            f"{MIN_FP8_CAPABILITY[0]}.{MIN_FP8_CAPABILITY[1]} or newer (Triton has no e4m3 "
            f"before Ada/Hopper); this GPU is {capability[0]}.{capability[1]}"
        )
    return None


class TritonAttentionImpl(AttentionImpl):
    """One layer. ``num_splits`` forces the decode partition count (tests, benchmarks;
    ``None`` lets :mod:`~kvplane_cuda.kernels.decode_attention` choose) and
    ``fused_reduce`` whether decode merges its partitions in the split kernel (see
    :func:`~kvplane_cuda.kernels.decode_attention.decode_attention`)."""

    def __init__(
        self,
        spec: AttentionSpec,
        num_splits: int | None = None,
        fused_reduce: bool = True,
    ) -> None:
        from kvplane_cuda.kernels import cache, decode_attention, paged_attention  # triton

        super().__init__(spec, cache.reshape_and_cache)
        self.num_splits = num_splits
        self.fused_reduce = fused_reduce
        self._decode = decode_attention.decode_attention
        self._unified = paged_attention.unified_attention

    def attend(
        self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata
    ) -> torch.Tensor:
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
                k_scale=self.k_scale,
                v_scale=self.v_scale,
            )
        else:
            self._unified(
                *tensors,
                metadata.max_query_len,
                spec.scale,
                spec.sliding_window,
                spec.logit_softcap,
                k_scale=self.k_scale,
                v_scale=self.v_scale,
            )
        return output
