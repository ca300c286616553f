"""Decode attention alone: the CUDA platform backend's ``forward`` on a Qwen3-0.6B-shaped
layer (16 query heads, 8 KV heads, head size 128, block 16, bf16), one new token per
sequence (its KV write included), random block tables, at several batches and contexts.

Bytes = KV read (2 * ctx * kv_heads * head_size * element size per sequence) + query
bytes; ``GBps`` = bytes read / median time. It is compared with the copy's
(read+write)/time (primary), the copy's one-way rate and the read-only rate (env section).
Timing: ``triton.testing.do_bench`` (warm-up, L2 flushed between runs, median), eager and,
when the forward captures, as a CUDA-graph replay of one call (``graph``: one graph
launch per call) and as a graph of :data:`NUM_GRAPH_LAYERS` calls, each on its own KV
cache and block table like the layers of a model's decode step (``layers``: time per
call; the graph launch is paid once per step in a model, and no layer's keys are in L2).
At batch 1 the rows also hold each kernel's device time from ``torch.profiler``
(``kernel_us``), the ``layers`` rate with the split reduction in its own kernel
(``unfused_layers_GBps``), next to the default fused one, and the per-launch time of
cut-down probe kernels on the same grid (``breakdown_us``: launch, bookkeeping loads,
streaming the keys and values, full kernel; :mod:`benchmarks.gpu.decode_breakdown`).
"""

from __future__ import annotations

import math
import traceback
from typing import Any

from benchmarks.gpu.common import Suite, free_memory, median_seconds
from benchmarks.gpu.env import memory_rates

NUM_HEADS, NUM_KV_HEADS, HEAD_SIZE, BLOCK_SIZE = 16, 8, 128, 16
#: Calls (each on its own cache: "layers") captured together for the ``layers`` timing.
NUM_GRAPH_LAYERS = 8
#: Memory the extra layers' caches may take, in bytes.
LAYERS_MEMORY_BYTES = 16 * 2**30


def make_backend(name: str, fused_decode_merge: bool = True) -> Any:
    if name == "triton":
        from kvplane_cuda.attention import TritonAttentionBackend

        return TritonAttentionBackend(fused_reduce=fused_decode_merge)
    if name == "reference":  # the core's torch reference: plumbing checks, not speed
        from kvplane.attention.reference import ReferenceAttentionBackend

        return ReferenceAttentionBackend()
    raise ValueError(f"unknown attention backend {name!r} (triton, reference)")


def run_attention(suite: Suite) -> dict[str, Any]:
    import torch

    from kvplane.plugins.types import AttentionSpec

    rates = memory_rates(suite)
    contexts: tuple[int, ...]
    batches: tuple[int, ...]
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
            backend = make_backend(name, suite.args.decode_merge == "fused")
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
                elif use_graphs and hasattr(impl, "num_splits") and (batch == 1 or context == 8192):
                    row["tile_sweep_GBps"] = sweep_tiles(impl, spec, batch, context, suite.device)
                    free_memory(suite.device)
                _add_fractions(row, rates)
                rows.append(row)
                suite.partial("attention", result)
                print(f"[attention] {name} {_describe(row)}", flush=True)
        if use_graphs and hasattr(impl, "num_splits"):
            result["backends"][name]["prefill_tile_sweep_TFLOPs"] = _sweep_prefill(spec, suite)
            free_memory(suite.device)
    return result


def bench_decode(
    impl: Any, spec: Any, batch: int, context: int, device: str, use_graphs: bool
) -> dict[str, Any]:
    import torch

    layer = _decode_layer(spec, batch, context, device)
    query = layer[0]

    def forward() -> Any:
        return impl.forward(*layer)

    output = forward()  # [batch, num_heads, head_size]
    if tuple(output.shape) != tuple(query.shape) or not bool(torch.isfinite(output).all()):
        raise RuntimeError(f"bad output: shape {tuple(output.shape)}, or not finite")
    element = query.element_size()
    row: dict[str, Any] = {
        "batch": batch,
        "context": context,
        "bytes_read": batch * context * 2 * spec.num_kv_heads * spec.head_size * element
        + query.numel() * element,
        "bytes_written": output.numel() * element + 2 * layer[1].numel() * element,
        "eager_seconds": _time(forward, device),
    }
    if not use_graphs:
        return row
    try:
        row["graph_seconds"] = _time(_captured([forward]), device)
        layers = _more_layers(layer, spec, batch, context, device)
        forwards = [lambda inputs=inputs: impl.forward(*inputs) for inputs in layers]
        num_layers = row["graph_layers"] = len(layers)
        row["layers_seconds"] = _time(_captured(forwards), device) / num_layers
        if batch == 1 and hasattr(impl, "fused_reduce"):
            from benchmarks.gpu.kernel_sweeps import copy_same_bytes

            from kvplane_cuda.attention import TritonAttentionImpl

            row["kernel_us"] = _kernel_times(forward)
            row["breakdown_us"] = _breakdown(impl, layers)
            row["copy_same_bytes"] = copy_same_bytes(row["bytes_read"], num_layers, _per_launch)
            separate = TritonAttentionImpl(impl.spec, impl.num_splits, fused_reduce=False)
            unfused = [lambda inputs=inputs: separate.forward(*inputs) for inputs in layers]
            seconds = _time(_captured(unfused), device) / num_layers
            row["unfused_layers_GBps"] = row["bytes_read"] / seconds / 1e9
    except Exception as error:
        row["graph_error"] = f"{type(error).__name__}: {error}"[:500]
    return row


def _breakdown(impl: Any, layers: list[tuple[Any, ...]]) -> dict[str, float]:
    """Per-launch time of the decode kernel's cut-down probes on the impl's split count
    (:mod:`benchmarks.gpu.decode_breakdown`)."""
    from benchmarks.gpu.decode_breakdown import breakdown

    return breakdown(layers, _num_splits(impl, layers[0]), _per_launch)


def _num_splits(impl: Any, layer: tuple[Any, ...]) -> int:
    """The decode partitions ``impl`` uses on ``layer`` (forced, or the heuristic's)."""
    from kvplane_cuda.kernels.decode_attention import choose_num_splits
    from kvplane_cuda.kernels.paged_attention import num_sms

    query, _, _, kv_cache, metadata = layer
    return impl.num_splits or choose_num_splits(
        query.shape[0], kv_cache.shape[3], metadata.max_seq_len, num_sms(query.device)
    )


def _more_layers(
    layer: tuple[Any, ...], spec: Any, batch: int, context: int, device: str
) -> list[tuple[Any, ...]]:
    """``layer`` plus up to ``NUM_GRAPH_LAYERS - 1`` others (within the memory cap)."""
    cache_bytes = layer[3].numel() * layer[3].element_size()
    num_layers = max(1, min(NUM_GRAPH_LAYERS, LAYERS_MEMORY_BYTES // cache_bytes))
    return [layer] + [_decode_layer(spec, batch, context, device) for _ in range(num_layers - 1)]


def _decode_layer(spec: Any, batch: int, context: int, device: str) -> tuple[Any, ...]:
    """``impl.forward`` arguments of one decode step of one layer: ``batch`` sequences of
    ``context`` tokens whose blocks are scattered over the cache."""
    import torch

    from kvplane.attention.metadata import AttentionMetadata

    blocks_per_seq = math.ceil(context / spec.block_size)
    num_blocks = batch * blocks_per_seq
    shape = (2, num_blocks, spec.block_size, spec.num_kv_heads, spec.head_size)
    kv_cache = torch.empty(shape, dtype=spec.dtype, device=device).normal_()
    # [batch, blocks_per_seq]
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
    return query, key, torch.randn_like(key), kv_cache, metadata


def _kernel_times(forward: Any, runs: int = 20) -> dict[str, float]:
    """Median device time of each kernel ``forward`` launches (``torch.profiler``), with
    the L2 flushed before every run."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    for _ in range(3):
        forward()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(runs):
            flush.zero_()
            forward()
        torch.cuda.synchronize()
    durations: dict[str, list[float]] = {}
    for event in prof.events():
        if event.device_type.name != "CUDA" or "elementwise" in event.name:
            continue  # the flush's fill kernel
        durations.setdefault(event.name[:60], []).append(event.time_range.elapsed_us())
    return {name: sorted(times)[len(times) // 2] for name, times in durations.items()}


def sweep_tiles(impl: Any, spec: Any, batch: int, context: int, device: str) -> dict[str, Any]:
    """``layers`` GB/s of the decode kernel per candidate tile
    (:func:`benchmarks.gpu.kernel_sweeps.decode_tile_sweep`): at batch 1 for 16, 32 and 64
    splits, else for the impl's split count."""
    from benchmarks.gpu.kernel_sweeps import decode_tile_sweep

    layers = _more_layers(_decode_layer(spec, batch, context, device), spec, batch, context, device)
    bytes_read = batch * context * 2 * spec.num_kv_heads * spec.head_size * spec.dtype.itemsize
    split_counts = (16, 32, 64) if batch == 1 else (_num_splits(impl, layers[0]),)
    return decode_tile_sweep(layers, bytes_read, split_counts, _per_launch, impl.fused_reduce)


def _sweep_prefill(spec: Any, suite: Suite) -> dict[str, Any]:
    from benchmarks.gpu.kernel_sweeps import prefill_tile_sweep

    try:
        return prefill_tile_sweep(
            spec.num_heads, spec.num_kv_heads, spec.head_size, spec.block_size, spec.dtype,
            _per_launch,
        )  # fmt: skip
    except Exception:
        return {"error": traceback.format_exc()}


def _per_launch(functions: list[Any]) -> float:
    """Seconds per function of ``functions`` replayed as one CUDA graph."""
    return _time(_captured(functions), "cuda") / len(functions)


def _captured(forwards: list[Any]) -> Any:
    """``forwards`` captured once, in order, in a CUDA graph; returns the replay function."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the default stream, as capture needs
        for _ in range(2):
            for forward in forwards:
                forward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for forward in forwards:
            forward()
    torch.cuda.synchronize()
    return graph.replay


def _time(fn: Any, device: str) -> float:
    if device == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100, return_mode="median") / 1000.0
    return median_seconds(fn, device, warmup=1, iters=3)


def _add_fractions(row: dict[str, Any], rates: dict[str, Any]) -> None:
    for mode in ("eager", "graph", "layers"):
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
    for mode in ("eager", "graph", "layers"):
        if f"{mode}_us" in row:
            parts.append(
                f"{mode} {row[f'{mode}_us']:.1f} us {row[f'{mode}_GBps']:.0f} GB/s "
                f"({row[f'{mode}_fraction_of_copy_read_write']:.2f} of copy)"
            )
    return " ".join(parts)
