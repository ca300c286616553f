"""The Metal paged-decode kernel's source, checked here for the interface it must have;
only a Mac compiles and runs it (the last test).

Checked: the kernel's buffers in the order and with the types the launcher binds them
(tensors as device buffers, ints as ``constant long&``, floats as ``constant float&``),
the instantiations the launcher names, and its threadgroup sizes and memory against the
Apple-GPU limits it assumes. The launcher is run against a stand-in library that
records the call.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

from kvplane.attention.metadata import AttentionMetadata
from kvplane.plugins.types import AttentionSpec
from kvplane_metal import attention, plugin
from kvplane_metal.kernels import paged_decode as kernel

SOURCE = kernel.SOURCE


def _signature() -> list[tuple[str, str, int]]:
    """(type, name, buffer index) of each ``[[buffer(i)]]`` argument, in source order."""
    block = SOURCE[SOURCE.index("#define PAGED_DECODE_ARGUMENTS") : SOURCE.index("template")]
    found = re.findall(
        r"((?:device|constant)[\w\s]*?[*&])\s*(\w+)\s*\[\[buffer\((\d+)\)\]\]", block
    )
    return [(" ".join(kind.split()), name, int(index)) for kind, name, index in found]


def test_buffers_are_bound_in_the_launchers_order_and_types() -> None:
    signature = _signature()
    assert [index for _, _, index in signature] == list(range(len(kernel.ARGUMENTS)))
    assert [(name, kind) for kind, name, _ in signature] == list(kernel.ARGUMENTS)


def test_instantiations_match_the_launchers_dtypes() -> None:
    names = re.findall(r"^INSTANTIATE_PAGED_DECODE\((\w+)\)$", SOURCE, re.M)
    assert sorted(names) == sorted(kernel.KERNEL_DTYPES.values())
    assert '[[host_name("paged_decode_" #T)]]' in SOURCE


def test_threadgroup_sizes_fit_the_limits_it_assumes() -> None:
    constants = dict(re.findall(r"constant constexpr uint (\w+) = (\d+);", SOURCE))
    assert int(constants["THREADS"]) == kernel.THREADS
    assert int(constants["SIMD_WIDTH"]) == kernel.SIMD_WIDTH
    assert int(constants["MAX_HEAD_SIZE"]) == kernel.MAX_HEAD_SIZE
    assert kernel.THREADS <= kernel.MAX_THREADS_PER_THREADGROUP
    assert kernel.THREADS % kernel.SIMD_WIDTH == 0  # whole simdgroups for the reductions
    assert kernel.THREADS >= kernel.MAX_HEAD_SIZE  # one output channel per thread
    sizes = {"MAX_HEAD_SIZE": kernel.MAX_HEAD_SIZE, "THREADS": kernel.THREADS}
    sizes["NUM_SIMDGROUPS"] = kernel.THREADS // kernel.SIMD_WIDTH
    arrays = re.findall(r"threadgroup float \w+\[(\w+)\];", SOURCE)
    assert len(arrays) == 3
    assert sum(4 * sizes[size] for size in arrays) <= kernel.MAX_THREADGROUP_MEMORY_BYTES
    # Every threadgroup array is reused across tiles only after a barrier.
    assert SOURCE.count("threadgroup_barrier(mem_flags::mem_threadgroup)") == 5


#: Host stand-ins for the Metal built-ins the kernel uses: enough for a C++ compiler to
#: parse and type-check its body (address spaces erased, attributes ignored).
HOST_METAL_STDLIB = """
#include <cmath>
#define device
#define constant
#define kernel
#define threadgroup static
typedef unsigned int uint;
typedef _Float16 half;
namespace metal {
enum class mem_flags { mem_threadgroup };
inline void threadgroup_barrier(mem_flags) {}
inline float simd_max(float x) { return x; }
inline float simd_sum(float x) { return x; }
inline float exp(float x) { return std::exp(x); }
inline float max(float a, float b) { return a > b ? a : b; }
namespace precise { inline float tanh(float x) { return std::tanh(x); } }
}
"""


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_kernel_body_type_checks_as_cpp_with_host_stand_ins(tmp_path: Path) -> None:
    """Not Metal's compiler, but it catches syntax and type errors in the body."""
    (tmp_path / "metal_stdlib.h").write_text(HOST_METAL_STDLIB)
    source = SOURCE.replace("#include <metal_stdlib>", '#include "metal_stdlib.h"')
    source = source.replace('[[host_name("paged_decode_" #T)]]', "")
    (tmp_path / "kernel.cpp").write_text(source)
    completed = subprocess.run(
        ["g++", "-std=c++17", "-fsyntax-only", "-Wall", "-Wno-attributes", "kernel.cpp"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 0, completed.stderr
    assert "warning" not in completed.stderr, completed.stderr


class RecordingLibrary:
    """Stands in for the compiled library: records the kernel's name and arguments."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def __getattr__(self, name: str) -> Any:
        def kernel_call(*args: Any, **kwargs: Any) -> None:
            self.calls.append((name, args, kwargs))

        return kernel_call


def test_launcher_binds_what_the_source_declares() -> None:
    num_seqs, num_heads, num_kv_heads, head_size, block_size, num_blocks = 3, 8, 2, 64, 16, 10
    query = torch.randn(num_seqs, num_heads, head_size, dtype=torch.float16)
    cache = torch.zeros(2, num_blocks, block_size, num_kv_heads, head_size, dtype=torch.float16)
    tables = torch.zeros(num_seqs, 4, dtype=torch.int32)
    lens = torch.tensor([5, 17, 40], dtype=torch.int32)
    library = RecordingLibrary()
    out = torch.empty_like(query)
    kernel.paged_decode(out, query, cache, tables, lens, 0.125, None, 30.0, shaders=library)
    ((name, args, kwargs),) = library.calls
    assert name == "paged_decode_half"
    assert len(args) == len(kernel.ARGUMENTS)
    for value, (arg_name, kind) in zip(args, kernel.ARGUMENTS, strict=True):
        if kind.startswith("device"):
            assert isinstance(value, torch.Tensor) and value.is_contiguous(), arg_name
            if "int*" in kind:
                assert value.dtype == torch.int32, arg_name
        else:
            assert type(value) is (float if "float" in kind else int), arg_name
    named = dict(zip([n for n, _ in kernel.ARGUMENTS], args, strict=True))
    assert named["num_slots"] == num_blocks * block_size and named["sliding_window"] == 0
    assert named["max_blocks_per_seq"] == 4 and named["softcap"] == 30.0
    assert kwargs == {
        "threads": num_seqs * num_heads * kernel.THREADS,
        "group_size": kernel.THREADS,
    }


def test_the_hook_offers_the_kernel_only_where_it_compiles(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = AttentionSpec(8, 2, 64, torch.float16, 16, 0.125)
    assert [b.name for b in plugin.kvplane_attention_backends(spec)] == ["metal-torch"]
    assert kernel.unavailable_reason() is not None  # no MPS here
    monkeypatch.setattr(kernel, "unavailable_reason", lambda: None)
    backends = plugin.kvplane_attention_backends(spec)
    assert [b.name for b in backends] == ["metal-shader", "metal-torch"]
    assert backends[0].priority > backends[1].priority
    assert backends[0].cannot_serve(spec) is None
    big = AttentionSpec(2, 2, 512, torch.float16, 16, 0.125)
    assert "head_size 512" in str(backends[0].cannot_serve(big))
    assert backends[1].cannot_serve(big) is None  # the torch path takes it


def test_shader_impl_runs_decode_steps_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pure-decode step goes to the kernel; a step with a prefill to the torch path."""
    spec = AttentionSpec(4, 2, 32, torch.float32, 16, 32**-0.5)
    impl = attention.MetalShaderAttentionBackend().make_impl(spec)
    calls: list[int] = []
    monkeypatch.setattr(kernel, "paged_decode", lambda out, *args: calls.append(out.shape[0]))
    cache = torch.randn(2, 4, 16, 2, 32)
    tables = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)

    def metadata(query_lens: list[int], seq_lens: list[int]) -> AttentionMetadata:
        starts = [0]
        for n in query_lens:
            starts.append(starts[-1] + n)
        return AttentionMetadata(
            torch.zeros(starts[-1], dtype=torch.int64),
            torch.tensor(starts, dtype=torch.int32),
            torch.tensor(seq_lens, dtype=torch.int32),
            tables,
            max(query_lens),
            max(seq_lens),
            tuple(starts),
            tuple(seq_lens),
        )

    impl.attend(torch.randn(2, 4, 32), cache, metadata([1, 1], [20, 9]))
    assert calls == [2]
    out = impl.attend(torch.randn(4, 4, 32), cache, metadata([3, 1], [20, 9]))
    assert calls == [2] and out.shape == (4, 4, 32) and bool(out.isfinite().all())


@pytest.mark.skipif(not torch.backends.mps.is_available(), reason="runs on a Mac only")
def test_kernel_matches_the_torch_path_on_a_mac() -> None:
    spec = AttentionSpec(8, 2, 64, torch.float16, 16, 0.125, sliding_window=24)
    device = torch.device("mps")
    generator = torch.Generator().manual_seed(0)
    cache = torch.randn(2, 12, 16, 2, 64, generator=generator).half().to(device)
    tables = torch.randperm(12, generator=generator)[:12].view(3, 4).int().to(device)
    seq_lens = [40, 7, 64]
    query = torch.randn(3, 8, 64, generator=generator).half().to(device)
    starts = (0, 1, 2, 3)
    metadata = AttentionMetadata(
        torch.zeros(3, dtype=torch.int64, device=device),
        torch.tensor(starts, dtype=torch.int32, device=device),
        torch.tensor(seq_lens, dtype=torch.int32, device=device),
        tables,
        1,
        max(seq_lens),
        starts,
        tuple(seq_lens),
    )
    expected = attention.MetalTorchAttentionBackend().make_impl(spec).attend(query, cache, metadata)
    out = torch.empty_like(query)
    kernel.paged_decode(out, query, cache, tables, metadata.seq_lens, 0.125, 24, None)
    torch.testing.assert_close(out.cpu().float(), expected.cpu().float(), atol=2e-3, rtol=2e-3)
