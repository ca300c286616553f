"""vLLM's FlashAttention decode kernel on the attention section's inputs, as a baseline.

Run by the ``vllm`` section as the run ``attn`` (a subprocess with vLLM's site on the
path): the same Qwen3-0.6B-shaped decode layers as :mod:`benchmarks.gpu.attention_bw`
(16 query / 8 KV heads, head 128, block 16, bf16, random block tables), attended by
``vllm.vllm_flash_attn.flash_attn_varlen_func`` (FlashAttention 3 on Hopper, the kernel
vLLM's default attention backend launches for decode) on kvplane's cache tensors, which
have the layout it expects per K and V (``[num_blocks, block_size, num_kv_heads,
head_size]``). Timed like kvplane's rows (``graph``: one call per graph; ``layers``: 8
layers per graph, per call), without the cache write, which vLLM launches separately.

    PYTHONPATH=/tmp/site python3 -m benchmarks.gpu.vllm_attention --out FILE.json
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.gpu.attention_bw import (
    BLOCK_SIZE,
    HEAD_SIZE,
    NUM_HEADS,
    NUM_KV_HEADS,
    _captured,
    _decode_layer,
    _more_layers,
    _time,
)

CONTEXTS = (1024, 8192, 32768)
BATCHES = (1, 32, 128)


def flash_decode(layer: tuple[Any, ...], out: Any) -> Any:
    """One decode call of vLLM's FlashAttention over ``layer`` (kvplane's inputs)."""
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    query, _, _, kv_cache, metadata = layer
    return flash_attn_varlen_func(
        q=query,
        k=kv_cache[0],
        v=kv_cache[1],
        out=out,
        cu_seqlens_q=metadata.query_start_loc,
        max_seqlen_q=1,
        seqused_k=metadata.seq_lens,
        max_seqlen_k=metadata.max_seq_len,
        softmax_scale=HEAD_SIZE**-0.5,
        causal=True,
        block_table=metadata.block_tables,
        fa_version=3,
    )


def bench(batch: int, context: int) -> dict[str, Any]:
    import torch

    from kvplane.plugins.types import AttentionSpec

    spec = AttentionSpec(
        num_heads=NUM_HEADS,
        num_kv_heads=NUM_KV_HEADS,
        head_size=HEAD_SIZE,
        dtype=torch.bfloat16,
        block_size=BLOCK_SIZE,
        scale=HEAD_SIZE**-0.5,
    )
    layers = _more_layers(_decode_layer(spec, batch, context, "cuda"), spec, batch, context, "cuda")
    outs = [torch.empty_like(layer[0]) for layer in layers]
    forwards = [
        lambda layer=layer, out=out: flash_decode(layer, out)
        for layer, out in zip(layers, outs, strict=True)
    ]
    bytes_read = batch * context * 2 * NUM_KV_HEADS * HEAD_SIZE * 2 + layers[0][0].numel() * 2
    graph_seconds = _time(_captured(forwards[:1]), "cuda")
    layers_seconds = _time(_captured(forwards), "cuda") / len(layers)
    return {
        "batch": batch,
        "context": context,
        "bytes_read": bytes_read,
        "graph_us": graph_seconds * 1e6,
        "graph_GBps": bytes_read / graph_seconds / 1e9,
        "layers_us": layers_seconds * 1e6,
        "layers_GBps": bytes_read / layers_seconds / 1e9,
        "graph_layers": len(layers),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    args = parser.parse_args(argv)
    import torch

    rows: list[dict[str, Any]] = []
    for context in CONTEXTS:
        for batch in BATCHES:
            try:
                row = bench(batch, context)
            except Exception:
                row = {"batch": batch, "context": context, "error": traceback.format_exc()}
            rows.append(row)
            print(json.dumps(row), flush=True)
            torch.cuda.empty_cache()
    Path(args.out).write_text(json.dumps({"kernel": "vllm_flash_attn fa3", "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
