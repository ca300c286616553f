"""Quantized matmuls against the bfloat16 one at Llama-3-8B's linear shapes, per step size.

For each ``(num_tokens, output_size, input_size)`` it times, with CUDA events (median of
``--iters`` after warm-up):

- ``bf16``: ``F.linear`` on the bfloat16 weight (cuBLAS), the baseline;
- ``w4a16_kernel``: the Triton W4A16 kernel (GPTQ layout, group 128, no act-order);
- ``w4a16_dequant``: dequantizing that weight to bfloat16, then cuBLAS (the large-step
  path of :class:`kvplane_cuda.quantization.TritonInt4Method`);
- ``w4a16_method``: the CUDA method as the engine calls it (picks one of the two);
- ``fp8``: :class:`kvplane_cuda.quantization.ScaledMmFp8Method` (per-token activations,
  per-channel weights), quantization of the activations included.

Each row also gives the kernel's weight-read rate (GB/s of packed int4 words) for the
small steps, where reading the weight is the whole cost. Writes ``quant_matmul.json``
under ``--out``.

    python3 benchmarks/gpu/quant_matmul.py --out $OUT
"""

from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from benchmarks.gpu.common import median_seconds

from kvplane.plugins.types import LayerQuantSpec
from kvplane.quantization.config import (
    OPT_ACTIVATIONS,
    OPT_CHECKPOINT,
    OPT_GROUP_SIZE,
    OPT_WEIGHT_STRATEGY,
)
from kvplane.quantization.int4_packing import dequantize_int4
from kvplane.quantization.int4_rtn import quantize_gptq_rtn
from kvplane_cuda.kernels.w4a16_matmul import w4a16_matmul
from kvplane_cuda.quantization import ScaledMmFp8Method, TritonGptqMethod

#: (output_size, input_size) of Llama-3-8B's qkv, o, gate_up and down projections.
LLAMA_8B_SHAPES = ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336))
TOKEN_COUNTS = (1, 4, 16, 32, 64, 128, 256, 512, 1024, 4096)
GROUP_SIZE = 128


def _layer(method: Any, spec: LayerQuantSpec, weight: torch.Tensor) -> torch.nn.Module:
    layer = torch.nn.Module()
    method.create_weights(layer, spec)
    float_weight = layer.weight
    assert isinstance(float_weight, torch.Tensor)
    float_weight.data.copy_(weight)
    layer.to("cuda")
    method.process_weights_after_loading(layer)
    return layer


def _time(fn: Callable[[], Any], iters: int) -> float:
    return median_seconds(fn, "cuda", warmup=3, iters=iters)


def sweep_shape(output_size: int, input_size: int, iters: int) -> list[dict[str, Any]]:
    """One row per token count for the ``[output_size, input_size]`` weight."""
    weight = (torch.randn(output_size, input_size, device="cuda") * 0.02).to(torch.bfloat16)
    packed = quantize_gptq_rtn(weight.float(), GROUP_SIZE)
    qweight, qzeros, scales = packed["qweight"], packed["qzeros"], packed["scales"]
    options = ((OPT_CHECKPOINT, None), (OPT_GROUP_SIZE, GROUP_SIZE))
    int4_spec = LayerQuantSpec("gptq", input_size, output_size, torch.bfloat16, options=options)
    int4_method = TritonGptqMethod()
    int4_layer = _layer(int4_method, int4_spec, weight)
    fp8_options = (
        (OPT_CHECKPOINT, None),
        (OPT_WEIGHT_STRATEGY, "channel"),
        (OPT_ACTIVATIONS, "dynamic"),
    )
    fp8_spec = LayerQuantSpec("fp8", input_size, output_size, torch.bfloat16, options=fp8_options)
    fp8_method = ScaledMmFp8Method()
    fp8_layer = _layer(fp8_method, fp8_spec, weight)
    packed_bytes = qweight.numel() * 4 + qzeros.numel() * 4 + scales.numel() * 2
    rows = []
    for num_tokens in TOKEN_COUNTS:
        x = torch.randn(num_tokens, input_size, device="cuda").to(torch.bfloat16)
        candidates = {
            "bf16": functools.partial(torch.nn.functional.linear, x, weight),
            "w4a16_kernel": functools.partial(_int4_kernel, x, qweight, qzeros, scales),
            "w4a16_dequant": functools.partial(_int4_dequant, x, qweight, qzeros, scales),
            "w4a16_method": functools.partial(int4_method.apply, int4_layer, x),
            "fp8": functools.partial(fp8_method.apply, fp8_layer, x),
        }
        expected = torch.nn.functional.linear(x.float(), int4_layer_weight(int4_layer))
        actual = candidates["w4a16_kernel"]().float()
        error = (actual - expected).abs().max().item() / expected.abs().max().item()
        seconds = {name: _time(fn, iters) for name, fn in candidates.items()}
        rows.append(
            {
                "num_tokens": num_tokens,
                "output_size": output_size,
                "input_size": input_size,
                "us": {name: round(value * 1e6, 1) for name, value in seconds.items()},
                "kernel_weight_gb_s": round(packed_bytes / seconds["w4a16_kernel"] / 1e9, 1),
                "bf16_weight_gb_s": round(weight.numel() * 2 / seconds["bf16"] / 1e9, 1),
                "kernel_max_rel_error": error,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _int4_kernel(
    x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor
) -> torch.Tensor:
    return w4a16_matmul(
        x, qweight, qzeros, scales, layout="gptq", group_size=GROUP_SIZE, zeros_offset=1
    )


def _int4_dequant(
    x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor
) -> torch.Tensor:
    full = dequantize_int4(
        "gptq", qweight, qzeros, scales, None, group_size=GROUP_SIZE, zeros_offset=1
    )  # [output_size, input_size] float32
    return torch.nn.functional.linear(x, full.to(x.dtype))


def int4_layer_weight(layer: torch.nn.Module) -> torch.Tensor:
    """The float32 weight the packed layer holds."""
    return dequantize_int4(
        "gptq",
        layer.qweight,  # type: ignore[arg-type]
        layer.qzeros,  # type: ignore[arg-type]
        layer.scales,  # type: ignore[arg-type]
        None,
        group_size=GROUP_SIZE,
        zeros_offset=1,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    rows = []
    for output_size, input_size in LLAMA_8B_SHAPES:
        rows.extend(sweep_shape(output_size, input_size, args.iters))
    result = {"device": torch.cuda.get_device_name(), "group_size": GROUP_SIZE, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quant_matmul.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
