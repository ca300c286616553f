"""The Metal paged-decode kernel's own source, run on the host against the reference.

The kernel body is compiled as C++20 with host stand-ins for the few Metal built-ins it
uses: address spaces erased, threadgroup memory as statics shared by one threadgroup's
threads, ``threadgroup_barrier`` a ``std::barrier`` and ``simd_max`` / ``simd_sum``
reductions over the 32 threads of each simdgroup. One threadgroup runs at a time, its
:data:`~kvplane_metal.kernels.paged_decode.THREADS` threads as ``std::thread``\\ s. This
checks the algorithm as written (tiling, online softmax, paging, window, soft-cap, GQA)
in float32; Metal's compiler, half precision and the GPU itself are a Mac's to verify.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import pytest
import torch

from kvplane.attention.reference import attend, gather_sequence_kv
from kvplane.plugins.types import AttentionSpec
from kvplane_metal.kernels import paged_decode as kernel

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")

HOST_METAL = """
#include <barrier>
#include <cmath>
#include <thread>
#include <vector>
#define device
#define constant
#define kernel
#define threadgroup static
typedef unsigned int uint;
typedef _Float16 half;
namespace host {
inline std::barrier<>* group_barrier = nullptr;
inline float lanes[%(threads)d];
inline thread_local uint tid = 0;
}
namespace metal {
enum class mem_flags { mem_threadgroup };
inline void threadgroup_barrier(mem_flags) { host::group_barrier->arrive_and_wait(); }
template <typename Reduce> float simd_reduce(float x, Reduce reduce) {
    host::lanes[host::tid] = x;
    host::group_barrier->arrive_and_wait();
    const uint first = host::tid / %(simd)d * %(simd)d;
    float result = host::lanes[first];
    for (uint lane = 1; lane < %(simd)d; ++lane) result = reduce(result, host::lanes[first + lane]);
    host::group_barrier->arrive_and_wait();
    return result;
}
inline float simd_max(float x) {
    return simd_reduce(x, [](float a, float b) { return a > b ? a : b; });
}
inline float simd_sum(float x) { return simd_reduce(x, [](float a, float b) { return a + b; }); }
inline float exp(float x) { return std::exp(x); }
inline float max(float a, float b) { return a > b ? a : b; }
namespace precise { inline float tanh(float x) { return std::tanh(x); } }
}
"""

HARNESS = """
extern "C" void run(
    float* out, const float* query, const float* kv_cache, const int* block_tables,
    const int* seq_lens, long num_seqs, long num_heads, long num_kv_heads, long head_size,
    long block_size, long max_blocks_per_seq, long num_slots, long sliding_window,
    float scale, float softcap) {
    for (uint group = 0; group < num_seqs * num_heads; ++group) {
        std::barrier<> barrier(THREADS);
        host::group_barrier = &barrier;
        std::vector<std::thread> threads;
        for (uint tid = 0; tid < THREADS; ++tid) {
            threads.emplace_back([&, tid] {
                host::tid = tid;
                paged_decode<float>(out, query, kv_cache, block_tables, seq_lens, num_heads,
                    num_kv_heads, head_size, block_size, max_blocks_per_seq, num_slots,
                    sliding_window, scale, softcap, group, tid, tid %% SIMD_WIDTH,
                    tid / SIMD_WIDTH);
            });
        }
        for (auto& thread : threads) thread.join();
    }
}
"""


COMPILE = ("g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-Wno-attributes")


@pytest.fixture(scope="module")
def host_kernel(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    directory = tmp_path_factory.mktemp("metal_kernel")
    stand_ins = HOST_METAL % {"threads": kernel.THREADS, "simd": kernel.SIMD_WIDTH}
    (directory / "metal_stdlib.h").write_text(stand_ins)
    source = kernel.SOURCE.replace("#include <metal_stdlib>", '#include "metal_stdlib.h"')
    source = source.replace('[[host_name("paged_decode_" #T)]]', "")
    (directory / "kernel.cpp").write_text(source + HARNESS % {})
    library = directory / "kernel.so"
    completed = subprocess.run(
        [*COMPILE, "kernel.cpp", "-o", str(library)],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    return ctypes.CDLL(str(library))


def _run(
    host_kernel: ctypes.CDLL,
    query: torch.Tensor,  # [num_seqs, num_heads, head_size] float32
    cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_size] float32
    tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    lens: torch.Tensor,  # [num_seqs] int32
    spec: AttentionSpec,
) -> torch.Tensor:
    out = torch.full_like(query, float("nan"))
    num_seqs, num_heads, head_size = query.shape
    _, num_blocks, block_size, num_kv_heads, _ = cache.shape
    pointers = [ctypes.c_void_p(t.data_ptr()) for t in (out, query, cache, tables, lens)]
    ints = (num_seqs, num_heads, num_kv_heads, head_size, block_size, tables.shape[1])
    host_kernel.run(
        *pointers,
        *(ctypes.c_long(n) for n in ints),
        ctypes.c_long(num_blocks * block_size),
        ctypes.c_long(spec.sliding_window or 0),
        ctypes.c_float(spec.scale),
        ctypes.c_float(spec.logit_softcap or 0.0),
    )
    return out


@pytest.mark.parametrize(
    "num_heads, num_kv_heads, head_size, block_size, window, softcap",
    [(4, 2, 64, 16, None, None), (4, 1, 40, 32, 300, 30.0)],
    ids=["gqa2-d64-b16", "mqa-d40-b32-window-softcap"],
)
def test_kernel_matches_the_reference(
    host_kernel: ctypes.CDLL,
    generator: torch.Generator,
    num_heads: int,
    num_kv_heads: int,
    head_size: int,
    block_size: int,
    window: int | None,
    softcap: float | None,
) -> None:
    """Lengths cross tile boundaries (1 key; one tile and a bit; several tiles)."""
    spec = AttentionSpec(
        num_heads, num_kv_heads, head_size, torch.float32, block_size, head_size**-0.5,
        sliding_window=window, logit_softcap=softcap,
    )  # fmt: skip
    seq_lens = [1, kernel.THREADS + 7, 3 * kernel.THREADS - 5]
    max_blocks = -(-max(seq_lens) // block_size)
    num_blocks = len(seq_lens) * max_blocks
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_size, generator=generator)
    tables = torch.randperm(num_blocks, generator=generator).view(len(seq_lens), max_blocks)
    tables = tables.to(torch.int32).contiguous()
    query = torch.randn(len(seq_lens), num_heads, head_size, generator=generator)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    out = _run(host_kernel, query, cache, tables, lens, spec)
    for index, seq_len in enumerate(seq_lens):
        keys, values = gather_sequence_kv(cache, tables[index], seq_len)
        expected = attend(query[index : index + 1], keys, values, spec)[0]
        torch.testing.assert_close(out[index], expected, atol=1e-5, rtol=1e-4)
