"""Decode attention alone: the CUDA platform backend's ``forward`` on a Qwen3-0.6B-shaped
layer (16 query heads, 8 KV heads, head size 128, block 16, bf16), one new token per
sequence (its KV write included), random block tables, at several batches and contexts.

Bytes = KV read (2 * ctx * kv_heads * head_size * element size per sequence) + query
bytes; ``GBps`` = bytes read / median time. It is compared with the copy's
(read+write)/time (primary), the copy's one-way rate and the read-only rate (env section).
Timing: ``triton.testing.do_bench`` (warm-up, L2 flushed between runs, median), eager and,
when the forward captures, as a CUDA-graph replay (device time without launch overhead).
"""

from __future__ import annotations

import math
import traceback
from typing import Any

from benchmarks.gpu.common import Suite, free_memory, median_seconds
from benchmarks.gpu.env import memory_rates

NUM_HEADS, NUM_KV_HEADS, HEAD_SIZE, BLOCK_SIZE = 16, 8, 128, 16


def make_backend(name: str) -> Any:
    if name == "triton":
        from kvplane_cuda.attention import TritonAttentionBackend

        return TritonAttentionBackend()
    if name == "reference":  # the core's torch reference: plumbing checks, not speed
        from kvplane.attention.reference import ReferenceAttentionBackend

        return ReferenceAttentionBackend()
    raise ValueError(f"unknown attention backend {name!r} (triton, reference)")


def run_attention(suite: Suite) -> dict[str, Any]:
    import torch

    from kvplane.plugins.types import AttentionSpec

    rates = memory_rates(suite)
    if suite.is_cuda:
        contexts, batches = (
            ((1024, 8192), (1, 32)) if suite.args.quick else ((1024, 8192, 32768), (1, 32, 128))
        )
        dtype = torch.bfloat16
    else:
        contexts, batches, dtype = (40,), (1, 2), torch.float32
    spec = AttentionSpec(
        num_heads=NUM_HEADS,
        num_kv_heads=NUM_KV_HEADS,
        head_size=HEAD_SIZE,
        dtype=dtype,
        block_size=BLOCK_SIZE,
        scale=HEAD_SIZE**-0.5,
    )
    result: dict[str, Any] = {
        "spec": {
            "num_heads": NUM_HEADS,
            "num_kv_heads": NUM_KV_HEADS,
            "head_size": HEAD_SIZE,
            "block_size": BLOCK_SIZE,
            "dtype": str(dtype).removeprefix("torch."),
        },
        "reference_rates_GBps": {
            key: rates[key]
            for key in ("copy_read_write_GBps", "copy_one_way_GBps", "read_only_GBps")
        },
        "backends": {},
    }
    for name in suite.args.attention_backends:
        try:
            backend = make_backend(name)
            reason = backend.cannot_serve(spec)
            if reason is not None:
                raise ValueError(f"{name} cannot serve the spec: {reason}")
            impl = backend.make_impl(spec)
        except Exception:
            result["backends"][name] = {"error": traceback.format_exc()}
            continue
        rows: list[dict[str, Any]] = []
        result["backends"][name] = {"name": getattr(backend, "name", name), "rows": rows}
        use_graphs = suite.is_cuda and not suite.args.no_attention_graphs
        for context in contexts:
            for batch in batches:
                try:
                    row = bench_decode(impl, spec, batch, context, suite.device, use_graphs)
                except Exception:
                    row = {"batch": batch, "context": context, "error": traceback.format_exc()}
                free_memory(suite.device)
                if "graph_error" in row:
                    use_graphs = False  # a failed capture may leave the stream unusable
                elif use_graphs and batch <= 32 and context >= 8192 and hasattr(impl, "num_splits"):
                    row["split_sweep_GBps"] = sweep_splits(impl, spec, batch, context, suite.device)
                    free_memory(suite.device)
                _add_fractions(row, rates)
                rows.append(row)
                suite.partial("attention", result)
                print(f"[attention] {name} {_describe(row)}", flush=True)
    return result


def bench_decode(
    impl: Any, spec: Any, batch: int, context: int, device: str, use_graphs: bool
) -> dict[str, Any]:
    import torch

    from kvplane.attention.metadata import AttentionMetadata

    blocks_per_seq = math.ceil(context / spec.block_size)
    num_blocks = batch * blocks_per_seq
    shape = (2, num_blocks, spec.block_size, spec.num_kv_heads, spec.head_size)
    kv_cache = torch.empty(shape, dtype=spec.dtype, device=device).normal_()
    # [batch, blocks_per_seq]: every sequence's blocks scattered over the cache
    block_tables = torch.randperm(num_blocks, device=device).view(batch, blocks_per_seq).int()
    last = context - 1  # position of the new token
    slot_mapping = block_tables[:, last // spec.block_size].long() * spec.block_size
    slot_mapping += last % spec.block_size  # [batch]
    metadata = AttentionMetadata(
        slot_mapping=slot_mapping,
        query_start_loc=torch.arange(batch + 1, dtype=torch.int32, device=device),
        seq_lens=torch.full((batch,), context, dtype=torch.int32, device=device),
        block_tables=block_tables,
        max_query_len=1,
        max_seq_len=context,
        query_start_loc_cpu=tuple(range(batch + 1)),
        seq_lens_cpu=(context,) * batch,
    )
    query = torch.randn(batch, spec.num_heads, spec.head_size, dtype=spec.dtype, device=device)
    key = torch.randn(batch, spec.num_kv_heads, spec.head_size, dtype=spec.dtype, device=device)
    value = torch.randn_like(key)

    def forward() -> Any:
        return impl.forward(query, key, value, kv_cache, metadata)

    output = forward()  # [batch, num_heads, head_size]
    if tuple(output.shape) != tuple(query.shape) or not bool(torch.isfinite(output).all()):
        raise RuntimeError(f"bad output: shape {tuple(output.shape)}, or not finite")
    element = query.element_size()
    row: dict[str, Any] = {
        "batch": batch,
        "context": context,
        "bytes_read": batch * context * 2 * spec.num_kv_heads * spec.head_size * element
        + query.numel() * element,
        "bytes_written": output.numel() * element + 2 * key.numel() * element,
        "eager_seconds": _time(forward, device),
    }
    if use_graphs:
        try:
            row["graph_seconds"] = _time(_captured(forward), device)
        except Exception as error:
            row["graph_error"] = f"{type(error).__name__}: {error}"[:500]
    return row


def sweep_splits(impl: Any, spec: Any, batch: int, context: int, device: str) -> dict[str, Any]:
    """Graph-replay GB/s of the decode kernel at forced split counts (to tune the
    split heuristic); the impl's own choice is restored afterwards."""
    sweep: dict[str, Any] = {}
    chosen = impl.num_splits
    try:
        for num_splits in (8, 16, 32, 64, 128, 256):
            impl.num_splits = num_splits
            try:
                row = bench_decode(impl, spec, batch, context, device, use_graphs=True)
                seconds = row.get("graph_seconds") or row["eager_seconds"]
                sweep[str(num_splits)] = row["bytes_read"] / seconds / 1e9
            except Exception as error:
                sweep[str(num_splits)] = f"{type(error).__name__}: {error}"[:200]
    finally:
        impl.num_splits = chosen
    return sweep


def _captured(forward: Any) -> Any:
    """``forward`` captured once in a CUDA graph; returns the replay function."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the default stream, as capture needs
        for _ in range(2):
            forward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        forward()
    torch.cuda.synchronize()
    return graph.replay


def _time(fn: Any, device: str) -> float:
    if device == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100, return_mode="median") / 1000.0
    return median_seconds(fn, device, warmup=1, iters=3)


def _add_fractions(row: dict[str, Any], rates: dict[str, Any]) -> None:
    for mode in ("eager", "graph"):
        seconds = row.get(f"{mode}_seconds")
        if not seconds:
            continue
        read_rate = row["bytes_read"] / seconds / 1e9
        row[f"{mode}_us"] = seconds * 1e6
        row[f"{mode}_GBps"] = read_rate
        row[f"{mode}_read_write_GBps"] = (row["bytes_read"] + row["bytes_written"]) / seconds / 1e9
        row[f"{mode}_fraction_of_copy_read_write"] = read_rate / rates["copy_read_write_GBps"]
        row[f"{mode}_fraction_of_copy_one_way"] = read_rate / rates["copy_one_way_GBps"]
        row[f"{mode}_fraction_of_read_only"] = read_rate / rates["read_only_GBps"]


def _describe(row: dict[str, Any]) -> str:
    head = f"batch {row['batch']:>3} ctx {row['context']:>6}:"
    if "error" in row:
        return f"{head} error {row['error'].strip().splitlines()[-1]}"
    parts = [head]
    for mode in ("eager", "graph"):
        if f"{mode}_us" in row:
            parts.append(
                f"{mode} {row[f'{mode}_us']:.1f} us {row[f'{mode}_GBps']:.0f} GB/s "
                f"({row[f'{mode}_fraction_of_copy_read_write']:.2f} of copy)"
            )
    return " ".join(parts)
