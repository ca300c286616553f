"""Paged decode attention as a Metal kernel, compiled through ``torch.mps.compile_shader``.

One threadgroup per (sequence, query head) walks the sequence's keys through its block
table in tiles of :data:`THREADS` positions: each thread scores one key, the tile's
maximum and sum are reduced with ``simd_max`` / ``simd_sum`` across simdgroups, and an
online softmax rescales the output, whose channel ``d`` is owned by thread ``d``
(hence :data:`THREADS` >= :data:`MAX_HEAD_SIZE`). Scores, softmax and the sum are in
float32; sliding window and soft-cap as the reference. The cache layout is the
engine's ``[2, num_blocks, block_size, num_kv_heads, head_size]``.

Only a Mac compiles it for the GPU; tests/platforms/metal checks its source for the
interface below and runs its body as C++ on host threads against the reference. Arguments
are bound in order: tensors as ``device`` buffers, Python ints as ``constant long&`` and
floats as ``constant float&``, which is how torch's shader library binds them.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

#: Threads per threadgroup: one key per thread per tile, one output channel per thread.
THREADS = 256
#: Apple GPUs' simdgroup width, which the reductions assume.
SIMD_WIDTH = 32
#: Largest head size (one output channel per thread).
MAX_HEAD_SIZE = 256
#: Limits of every Apple-silicon GPU the kernel assumes (Metal feature set tables).
MAX_THREADS_PER_THREADGROUP = 1024
MAX_THREADGROUP_MEMORY_BYTES = 32 << 10
#: Model dtypes with an instantiation, by the suffix of their kernel's host name.
KERNEL_DTYPES = {torch.float16: "half", torch.float32: "float"}
#: The kernel's buffers in binding order: (name, Metal type). Checked against SOURCE.
ARGUMENTS: tuple[tuple[str, str], ...] = (
    ("out", "device T*"),  # [num_seqs, num_heads, head_size]
    ("query", "device const T*"),  # [num_seqs, num_heads, head_size]
    ("kv_cache", "device const T*"),  # [2, num_blocks, block_size, num_kv_heads, head_size]
    ("block_tables", "device const int*"),  # [num_seqs, max_blocks_per_seq] int32
    ("seq_lens", "device const int*"),  # [num_seqs] int32
    ("num_heads", "constant long&"),
    ("num_kv_heads", "constant long&"),
    ("head_size", "constant long&"),
    ("block_size", "constant long&"),
    ("max_blocks_per_seq", "constant long&"),
    ("num_slots", "constant long&"),  # block_size * num_blocks: where values start
    ("sliding_window", "constant long&"),  # 0: none
    ("scale", "constant float&"),
    ("softcap", "constant float&"),  # 0: none
)

SOURCE = f"""
#include <metal_stdlib>
using namespace metal;

constant constexpr uint THREADS = {THREADS};
constant constexpr uint SIMD_WIDTH = {SIMD_WIDTH};
constant constexpr uint NUM_SIMDGROUPS = THREADS / SIMD_WIDTH;
constant constexpr uint MAX_HEAD_SIZE = {MAX_HEAD_SIZE};
// Below any score, yet finite: Metal may compile with fast math, which assumes no infinities.
constant constexpr float NO_SCORE = -1e30f;

#define PAGED_DECODE_ARGUMENTS(T)                                   \\
    device T* out [[buffer(0)]],                                    \\
    device const T* query [[buffer(1)]],                            \\
    device const T* kv_cache [[buffer(2)]],                         \\
    device const int* block_tables [[buffer(3)]],                   \\
    device const int* seq_lens [[buffer(4)]],                       \\
    constant long& num_heads [[buffer(5)]],                         \\
    constant long& num_kv_heads [[buffer(6)]],                      \\
    constant long& head_size [[buffer(7)]],                         \\
    constant long& block_size [[buffer(8)]],                        \\
    constant long& max_blocks_per_seq [[buffer(9)]],                \\
    constant long& num_slots [[buffer(10)]],                        \\
    constant long& sliding_window [[buffer(11)]],                   \\
    constant float& scale [[buffer(12)]],                           \\
    constant float& softcap [[buffer(13)]],                         \\
    uint group [[threadgroup_position_in_grid]],                    \\
    uint tid [[thread_position_in_threadgroup]],                    \\
    uint simd_lane [[thread_index_in_simdgroup]],                   \\
    uint simd_id [[simdgroup_index_in_threadgroup]]

template <typename T>
kernel void paged_decode(PAGED_DECODE_ARGUMENTS(T)) {{
    threadgroup float q[MAX_HEAD_SIZE];
    threadgroup float probs[THREADS];
    threadgroup float partial[NUM_SIMDGROUPS];

    const long seq = group / num_heads;
    const long head = group % num_heads;
    const long kv_head = head / (num_heads / num_kv_heads);
    const long seq_len = seq_lens[seq];
    const bool is_windowed = sliding_window > 0 && seq_len > sliding_window;
    const long first = is_windowed ? seq_len - sliding_window : 0;
    const long slot_stride = num_kv_heads * head_size;
    device const T* keys = kv_cache + kv_head * head_size;
    device const T* values = kv_cache + num_slots * slot_stride + kv_head * head_size;
    device const int* table = block_tables + seq * max_blocks_per_seq;

    device const T* q_row = query + (seq * num_heads + head) * head_size;
    for (long d = tid; d < head_size; d += THREADS) {{
        q[d] = float(q_row[d]);
    }}
    threadgroup_barrier(mem_flags::mem_threadgroup);

    float running_max = NO_SCORE;
    float running_sum = 0.0f;
    float acc = 0.0f;
    for (long tile = first; tile < seq_len; tile += THREADS) {{
        const long pos = tile + tid;
        float score = NO_SCORE;
        if (pos < seq_len) {{
            const long slot = long(table[pos / block_size]) * block_size + pos % block_size;
            device const T* k = keys + slot * slot_stride;
            float dot = 0.0f;
            for (long d = 0; d < head_size; ++d) {{
                dot += q[d] * float(k[d]);
            }}
            score = dot * scale;
            if (softcap > 0.0f) {{
                score = softcap * precise::tanh(score / softcap);
            }}
        }}
        const float simd_tile_max = simd_max(score);
        if (simd_lane == 0) {{
            partial[simd_id] = simd_tile_max;
        }}
        threadgroup_barrier(mem_flags::mem_threadgroup);
        float tile_max = partial[0];
        for (uint s = 1; s < NUM_SIMDGROUPS; ++s) {{
            tile_max = max(tile_max, partial[s]);
        }}
        // Finite: every tile holds at least one position of the sequence.
        const float new_max = max(running_max, tile_max);
        const float p = pos < seq_len ? exp(score - new_max) : 0.0f;
        probs[tid] = p;
        threadgroup_barrier(mem_flags::mem_threadgroup);
        const float simd_tile_sum = simd_sum(p);
        if (simd_lane == 0) {{
            partial[simd_id] = simd_tile_sum;
        }}
        threadgroup_barrier(mem_flags::mem_threadgroup);
        float tile_sum = 0.0f;
        for (uint s = 0; s < NUM_SIMDGROUPS; ++s) {{
            tile_sum += partial[s];
        }}
        const float correction = exp(running_max - new_max);
        running_sum = running_sum * correction + tile_sum;
        if (long(tid) < head_size) {{
            float sum = acc * correction;
            const long tile_len = seq_len - tile < long(THREADS) ? seq_len - tile : long(THREADS);
            for (long j = 0; j < tile_len; ++j) {{
                const long key = tile + j;
                const long slot = long(table[key / block_size]) * block_size + key % block_size;
                sum += probs[j] * float(values[slot * slot_stride + tid]);
            }}
            acc = sum;
        }}
        running_max = new_max;
        // probs and partial are rewritten by the next tile.
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }}
    if (long(tid) < head_size) {{
        out[(seq * num_heads + head) * head_size + tid] = T(acc / running_sum);
    }}
}}

#define INSTANTIATE_PAGED_DECODE(T)                                 \\
    template [[host_name("paged_decode_" #T)]] kernel void          \\
    paged_decode<T>(PAGED_DECODE_ARGUMENTS(T));

INSTANTIATE_PAGED_DECODE(half)
INSTANTIATE_PAGED_DECODE(float)
"""


def cannot_serve(
    dtype: torch.dtype, kv_cache_dtype: torch.dtype | None, head_size: int
) -> str | None:
    """Why the kernel cannot serve a layer of this shape, or ``None``."""
    if dtype not in KERNEL_DTYPES:
        return f"the Metal decode kernel has no {dtype} instantiation (float16, float32)"
    if kv_cache_dtype is not None and kv_cache_dtype != dtype:
        return f"the Metal decode kernel reads a {dtype} cache, not {kv_cache_dtype}"
    if head_size > MAX_HEAD_SIZE:
        return f"head_size {head_size} is larger than the Metal decode kernel's {MAX_HEAD_SIZE}"
    return None


@functools.cache
def unavailable_reason() -> str | None:
    """Why the kernel cannot run in this process (no MPS, no ``compile_shader``, or the
    compiler's error), or ``None``. Compiles once, on the first call; the answer is
    kept for the process."""
    if not torch.backends.mps.is_available():
        return "MPS is not available (the Metal kernel runs on a Mac only)"
    if not hasattr(torch.mps, "compile_shader"):
        return f"torch {torch.__version__} has no torch.mps.compile_shader"
    try:
        library()
    except Exception as error:  # the Metal compiler's message, whatever its type
        return f"the Metal decode kernel did not compile: {error}"
    return None


@functools.cache
def library() -> Any:
    """The compiled shader library (cached per process)."""
    return torch.mps.compile_shader(SOURCE)


def paged_decode(
    out: torch.Tensor,  # [num_seqs, num_heads, head_size], written
    query: torch.Tensor,  # [num_seqs, num_heads, head_size]: one new token per sequence
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_size]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32, including the new token
    scale: float,
    sliding_window: int | None,
    softcap: float | None,
    shaders: Any = None,
) -> None:
    """Attend each sequence's one query over its cached keys, into ``out``.

    ``shaders`` is the compiled library (default :func:`library`; tests pass a stand-in).
    Does not modify ``kv_cache``.
    """
    num_seqs, num_heads, head_size = query.shape
    _, num_blocks, block_size, num_kv_heads, _ = kv_cache.shape
    kernel = getattr(shaders or library(), f"paged_decode_{KERNEL_DTYPES[query.dtype]}")
    kernel(
        out,
        query.contiguous(),
        kv_cache,
        block_tables.to(torch.int32).contiguous(),
        seq_lens.to(torch.int32).contiguous(),
        num_heads,
        num_kv_heads,
        head_size,
        block_size,
        block_tables.shape[1],
        num_blocks * block_size,
        sliding_window or 0,
        float(scale),
        float(softcap or 0.0),
        threads=num_seqs * num_heads * THREADS,
        group_size=THREADS,
    )
