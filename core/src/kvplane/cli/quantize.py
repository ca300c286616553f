"""``kvplane quantize SRC OUT --method {fp8,int8,gptq,awq} [--bits 4] [--group-size N]``:
write a quantized copy of a Hugging Face checkpoint (round-to-nearest, no calibration
data) that kvplane and vLLM load.

See :mod:`kvplane.quantization.writer` for which tensors are quantized and the layout.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

#: The formats written (kvplane.quantization.writer.METHODS, kept here so that building
#: the parser imports no torch).
METHODS = ("fp8", "int8", "gptq", "awq")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``quantize`` on the top-level ``subparsers``."""
    parser = subparsers.add_parser(
        "quantize",
        help="write a quantized copy of a Hugging Face checkpoint",
        description=__doc__,
    )
    parser.add_argument("source", type=Path, help="Hugging Face model directory (safetensors)")
    parser.add_argument("target", type=Path, help="directory to write (new or empty)")
    parser.add_argument("--method", required=True, choices=METHODS, help="quantization format")
    parser.add_argument(
        "--bits", type=int, default=None, help="weight bits: 8 for fp8/int8, 4 for gptq/awq"
    )
    parser.add_argument(
        "--group-size",
        type=int,
        default=128,
        help="gptq/awq: input columns per scale, -1 for one per row (default: 128)",
    )
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from kvplane.quantization.writer import quantize_checkpoint

    expected_bits = 4 if args.method in ("gptq", "awq") else 8
    if args.bits not in (None, expected_bits):
        raise ValueError(
            f"--method {args.method} writes {expected_bits}-bit weights, not {args.bits}"
        )
    if args.group_size <= 0 and args.group_size != -1:
        raise ValueError(f"--group-size must be positive or -1, got {args.group_size}")
    summary = quantize_checkpoint(args.source, args.target, args.method, args.group_size)
    print(
        f"wrote {args.target}: {summary.num_quantized} matrices in {args.method}, "
        f"{summary.num_float} tensors kept, {summary.num_shards} file(s), "
        f"{summary.num_bytes / 2**20:.1f} MiB"
    )
    return 0
