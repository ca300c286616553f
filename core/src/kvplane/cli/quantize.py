"""``kvplane quantize SRC OUT --method {fp8,int8}``: write a quantized copy of a Hugging
Face checkpoint (round-to-nearest, no calibration data) that kvplane and vLLM load.

See :mod:`kvplane.quantization.writer` for which tensors are quantized and the layout.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

#: The formats written (kvplane.quantization.writer.METHODS, kept here so that building
#: the parser imports no torch).
METHODS = ("fp8", "int8")


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
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from kvplane.quantization.writer import quantize_checkpoint

    summary = quantize_checkpoint(args.source, args.target, args.method)
    print(
        f"wrote {args.target}: {summary.num_quantized} matrices in {args.method}, "
        f"{summary.num_float} tensors kept, {summary.num_shards} file(s), "
        f"{summary.num_bytes / 2**20:.1f} MiB"
    )
    return 0
