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


#: Idle stretches of the device shorter than this are launch spacing, not host stalls.
GAP_FLOOR_US = 20.0


def idle_gaps(intervals: list[tuple[float, float, str]]) -> dict[str, Any]:
    """Where the device sat idle between kernels: ``intervals`` are (start us, end us,
    name) of every device activity. Returns the busy and idle totals over the span,
    idle time by gap size, and the longest gaps with the kernels on either side."""
    intervals = sorted(intervals)
    gaps: list[tuple[float, str, str, float]] = []  # (length, before, after, start) in us
    busy_end = intervals[0][1] if intervals else 0.0
    last_name = intervals[0][2] if intervals else ""
    for start, end, name in intervals[1:]:
        if start - busy_end > GAP_FLOOR_US:
            gaps.append((start - busy_end, last_name, name, busy_end - intervals[0][0]))
        if end > busy_end:
            busy_end, last_name = end, name
    buckets = {"20us-100us": 0.0, "100us-1ms": 0.0, "1ms-10ms": 0.0, ">=10ms": 0.0}
    for length, *_ in gaps:
        key = (
            "20us-100us" if length < 100 else "100us-1ms" if length < 1000
            else "1ms-10ms" if length < 10_000 else ">=10ms"
        )  # fmt: skip
        buckets[key] += length / 1000
    span_us = (busy_end - intervals[0][0]) if intervals else 0.0
    longest = sorted(gaps, reverse=True)[:25]
    return {
        "span_ms": span_us / 1000,
        "idle_ms": sum(g[0] for g in gaps) / 1000,
        "num_gaps": len(gaps),
        "idle_ms_by_gap": buckets,
        "longest": [
            {"ms": length / 1000, "at_ms": at / 1000, "after": before[:80], "before": after[:80]}
            for length, before, after, at in longest
        ],
    }


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
    intervals = [
        (event.time_range.start, event.time_range.end, event.name)
        for event in profiler.events()
        if event.device_type.name == "CUDA"
    ]
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
        "idle": idle_gaps(intervals),
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
    idle = report["idle"]
    print(f"idle {idle['idle_ms']:,.1f} ms of {idle['span_ms']:,.1f} in {idle['num_gaps']} gaps")
    print(f"  by gap: {idle['idle_ms_by_gap']}")
    for gap in idle["longest"][:10]:
        print(
            f"  {gap['ms']:7.2f} ms at {gap['at_ms']:8.1f} ms, after {gap['after'][:40]} "
            f"before {gap['before'][:40]}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
