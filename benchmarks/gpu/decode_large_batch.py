"""Decode attention at serving batch sizes: the launch shapes a saturated engine runs.

The attention section (:mod:`benchmarks.gpu.attention_bw`) tunes the decode kernel at
batch 1-128; a saturated engine decodes 256 sequences of about a thousand keys each,
where the kernel's bandwidth decides the step time. For each ``--shapes`` entry
``<batch>x<context>`` this script times, per launch in a CUDA graph of several layers
(none in L2), the decode kernel for every candidate tile x split count, with the block
tables scattered and, for the default launch, contiguous; beside it the copy moving as
many bytes. ``--prefill-shapes``
``<seqs>x<new>x<cached>`` adds the unified kernel's tile sweep (TFLOP/s).

Writes ``decode_large_batch.json`` under ``--out`` (default ``$OUT``) and prints a line
per timing. Usage on the GPU machine::

    python3 benchmarks/gpu/decode_large_batch.py --shapes 256x1088,128x1088
"""

from __future__ import annotations

import argparse
import dataclasses
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
    from benchmarks.gpu.attention_bw import (
        BLOCK_SIZE,
        HEAD_SIZE,
        NUM_HEADS,
        NUM_KV_HEADS,
        _decode_layer,
        _more_layers,
        _per_launch,
    )
    from benchmarks.gpu.decode_breakdown import decode_launcher
    from benchmarks.gpu.kernel_sweeps import copy_same_bytes, decode_tile_sweep

    from kvplane.plugins.types import AttentionSpec

    spec = AttentionSpec(
        num_heads=NUM_HEADS, num_kv_heads=NUM_KV_HEADS, head_size=HEAD_SIZE,
        dtype=torch.bfloat16, block_size=BLOCK_SIZE, scale=HEAD_SIZE**-0.5,
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
    for tables, table_layers in (("scattered", layers), ("contiguous", _contiguous(layers))):
        launches = [decode_launcher(layer, None) for layer in table_layers]
        try:
            result["GBps"][f"default/{tables}"] = bytes_read / _per_launch(launches) / 1e9
        except Exception as error:
            result["GBps"][f"default/{tables}"] = f"{type(error).__name__}: {error}"[:200]
    result["GBps"].update(decode_tile_sweep(layers, bytes_read, SPLITS, _per_launch, True, TILES))
    for name, rate in result["GBps"].items():
        print(f"[decode {batch}x{context}] {name}: {rate}", flush=True)
    return result


def _contiguous(layers: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """``layers`` with each sequence's blocks numbered in order (the best case for DRAM)."""
    import torch

    changed = []
    for query, key, value, kv_cache, metadata in layers:
        tables = metadata.block_tables  # [num_seqs, max_num_blocks_per_seq] int32
        ordered = torch.arange(tables.numel(), dtype=torch.int32, device=tables.device)
        metadata = dataclasses.replace(metadata, block_tables=ordered.view_as(tables))
        changed.append((query, key, value, kv_cache, metadata))
    return changed


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
