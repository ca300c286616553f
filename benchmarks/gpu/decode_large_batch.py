"""Decode attention at serving batch sizes: the launch shapes a saturated engine runs.

The attention section (:mod:`benchmarks.gpu.attention_bw`) tunes the decode kernel at
batch 1-128; a saturated engine decodes 256 sequences of about a thousand keys each,
where the kernel's bandwidth decides the step time. For each ``--shapes`` entry
``<batch>x<context>`` this script times, per launch in a CUDA graph of several layers
(none in L2), the decode kernel for every candidate tile x split count x program order
(``heads_fastest``: the KV heads of one sequence in consecutive programs, or the
sequences of one KV head), with the block tables scattered and, for the default launch,
contiguous; beside it the copy moving as many bytes. ``--prefill-shapes``
``<seqs>x<new>x<cached>`` adds the unified kernel's tile sweep (TFLOP/s).

Writes ``decode_large_batch.json`` under ``--out`` (default ``$OUT``) and prints a line
per timing. Usage on the GPU machine::

    python3 benchmarks/gpu/decode_large_batch.py --shapes 256x1088,128x1088
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any, cast

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.gpu.common import bootstrap_kvplane

#: (keys a tile, warps, stages) candidates; the rows come from the group size.
TILES = ((64, 4, 3), (64, 4, 2), (32, 4, 3), (32, 4, 4), (64, 8, 3), (128, 4, 2), (128, 8, 2))
SPLITS = (1, 2, 3, 4)


def parse_shapes(text: str, parts: int) -> list[tuple[int, ...]]:
    shapes = []
    for item in filter(None, text.split(",")):
        numbers = tuple(int(n) for n in item.split("x"))
        if len(numbers) != parts:
            raise ValueError(f"shape {item!r}: expected {parts} numbers joined by x")
        shapes.append(numbers)
    return shapes


def decode_sweep(batch: int, context: int) -> dict[str, Any]:
    import torch
    from benchmarks.gpu.attention_bw import _decode_layer, _more_layers, _per_launch
    from benchmarks.gpu.kernel_sweeps import copy_same_bytes

    from kvplane.plugins.types import AttentionSpec
    from kvplane_cuda.kernels.decode_attention import decode_attention, decode_tile
    from kvplane_cuda.kernels.paged_attention import Tile

    spec = AttentionSpec(
        num_heads=16, num_kv_heads=8, head_size=128, dtype=torch.bfloat16, block_size=16,
        scale=128**-0.5,
    )  # fmt: skip
    layers: list[tuple[Any, ...]] = _more_layers(
        _decode_layer(spec, batch, context, "cuda"), spec, batch, context, "cuda"
    )
    bytes_read = batch * context * 2 * spec.num_kv_heads * spec.head_size * 2
    result: dict[str, Any] = {
        "batch": batch,
        "context": context,
        "num_layers": len(layers),
        "bytes_read": bytes_read,
        "copy": copy_same_bytes(bytes_read, len(layers), _per_launch),
        "GBps": {},
    }
    rows = decode_tile(128, 2, 2).block_m

    def rate(tables: str, splits: int | None, tile: Any, heads_fastest: bool) -> float | str:
        launches = []
        for query, _, _, kv_cache, metadata in layers:
            block_tables = metadata.block_tables
            if tables == "contiguous":
                block_tables = torch.arange(
                    block_tables.numel(), dtype=torch.int32, device="cuda"
                ).view_as(block_tables)
            out = torch.empty_like(query)
            arguments = (out, query, kv_cache, block_tables, metadata.seq_lens,
                         metadata.query_start_loc, metadata.max_seq_len, 128**-0.5)  # fmt: skip
            launches.append(
                lambda a=arguments: decode_attention(
                    *a, num_splits=splits, tile=tile, heads_fastest=heads_fastest
                )
            )
        try:
            return bytes_read / _per_launch(launches) / 1e9
        except Exception as error:
            return f"{type(error).__name__}: {error}"[:200]

    for heads_fastest in (True, False):
        order = "heads" if heads_fastest else "seqs"
        for tables in ("scattered", "contiguous"):
            name = f"default/{order}/{tables}"
            result["GBps"][name] = rate(tables, None, None, heads_fastest)
            print(f"[decode {batch}x{context}] {name}: {result['GBps'][name]}", flush=True)
        for block_n, num_warps, num_stages in TILES:
            for splits in SPLITS:
                tile = Tile(rows, block_n, num_warps, num_stages)
                name = f"n{block_n}w{num_warps}s{num_stages}/splits{splits}/{order}"
                result["GBps"][name] = rate("scattered", splits, tile, heads_fastest)
                print(f"[decode {batch}x{context}] {name}: {result['GBps'][name]}", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="256x1088,128x1088")
    parser.add_argument("--prefill-shapes", default="8x1024x0,4x2048x0")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args(argv)
    bootstrap_kvplane()
    import torch
    from benchmarks.gpu.attention_bw import _per_launch
    from benchmarks.gpu.kernel_sweeps import prefill_tile_sweep

    results: dict[str, Any] = {"device": torch.cuda.get_device_name(), "decode": []}
    path = Path(args.out) / "decode_large_batch.json"
    for batch, context in parse_shapes(args.shapes, 2):
        try:
            results["decode"].append(decode_sweep(batch, context))
        except Exception:
            results["decode"].append({"shape": [batch, context], "error": traceback.format_exc()})
        torch.cuda.empty_cache()  # the shape's layers are gone with its sweep
        path.write_text(json.dumps(results, indent=1))
    prefill_shapes = cast("list[tuple[int, int, int]]", parse_shapes(args.prefill_shapes, 3))
    if prefill_shapes:
        try:
            results["prefill_TFLOPs"] = prefill_tile_sweep(
                16, 8, 128, 16, torch.bfloat16, _per_launch, shapes=prefill_shapes
            )
        except Exception:
            results["prefill_TFLOPs"] = {"error": traceback.format_exc()}
        print(f"[prefill] {results['prefill_TFLOPs']}", flush=True)
    path.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
