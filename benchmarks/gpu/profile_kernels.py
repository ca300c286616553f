"""Device time by kernel over one kvplane offline run (torch profiler, CUDA activity).

Where a workload's device time goes, grouped into attention, matrix multiplies and the
rest, so a gap to another engine's throughput can be named. Workload A by default
(random 1024 -> 128, 500 prompts); the engine's usual warm-up request runs unprofiled.

    python3 benchmarks/gpu/profile_kernels.py --model qwen3-0.6b --out $OUT

Writes ``profile_kernels.json`` (kernels by total time, the groups, the run's figures)
and prints the top kernels.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

#: Substrings of a kernel name -> its group (first match wins; the rest is "other").
GROUPS = (
    ("attention", ("attention", "_unified_kernel", "_decode_split", "flash")),
    ("matmul", ("gemm", "sm90_xmma", "cutlass", "nvjet", "cublas", "matmul")),
    ("norm/rope/act", ("rms", "norm", "rotary", "rope", "silu", "act_and_mul")),
    ("sampling", ("sort", "topk", "exponential", "argmax", "softmax", "multinomial")),
)


def group_of(name: str) -> str:
    lowered = name.lower()
    for group, needles in GROUPS:
        if any(needle in lowered for needle in needles):
            return group
    return "other"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen3-0.6b", help="built-in config or folder")
    parser.add_argument("--input-len", type=int, default=1024)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--num-prompts", type=int, default=500)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--out", default=os.environ.get("OUT") or ".out")
    args = parser.parse_args()

    from torch.profiler import ProfilerActivity, profile

    from kvplane.bench.datasets import random_requests
    from kvplane.bench.throughput import run_kvplane
    from kvplane.config import EngineConfig
    from kvplane.engine.llm import LLM

    config = EngineConfig(
        model=args.model, device="cuda", load_format="dummy", max_model_len=args.max_model_len
    )
    llm = LLM.from_config(config)
    vocab_size = llm.engine.model_config.hf_config.vocab_size
    requests = random_requests(
        args.num_prompts, args.input_len, args.output_len, vocab_size, seed=0
    )
    run_kvplane(llm, requests[:8], 1.0)  # warm-up, unprofiled
    with profile(activities=[ProfilerActivity.CUDA]) as profiler:
        figures = run_kvplane(llm, requests, 1.0, warmup=False)
    kernels: dict[str, dict[str, float]] = {}
    for event in profiler.key_averages():
        device_us = float(event.device_time_total or 0.0)
        if device_us <= 0:
            continue
        kernels[event.key] = {"us": device_us, "calls": float(event.count)}
    total_us = sum(k["us"] for k in kernels.values())
    groups: dict[str, float] = {}
    for name, entry in kernels.items():
        groups[group_of(name)] = groups.get(group_of(name), 0.0) + entry["us"]
    ranked = sorted(kernels.items(), key=lambda item: -item[1]["us"])
    report: dict[str, Any] = {
        "figures": figures,
        "device_ms_total": total_us / 1000,
        "device_ms_per_step": total_us / 1000 / max(figures["num_steps"], 1),
        "groups_ms": {name: us / 1000 for name, us in sorted(groups.items())},
        "kernels": [{"name": name, **entry} for name, entry in ranked[:40]],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile_kernels.json").write_text(json.dumps(report, indent=1))
    print(f"elapsed {figures['elapsed_time']:.2f} s, {figures['output_tokens_per_second']:,.0f}")
    print(f"device {total_us / 1000:,.1f} ms over {figures['num_steps']:.0f} steps")
    for name, ms in report["groups_ms"].items():
        print(f"  {name:14s} {ms:9.1f} ms  {100 * ms * 1000 / total_us:5.1f}%")
    for name, entry in ranked[:15]:
        print(f"  {entry['us'] / 1000:9.1f} ms {int(entry['calls']):7d}x  {name[:90]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
