"""kvplane's CUDA platform on one GPU, in one go: tests, correctness and benchmarks.

Sections (``--sections``, default all but ``vllm``): ``env`` (versions, copy bandwidth,
matmul rate), ``tests`` (pytest on tests/platforms/cuda and the conformance kit, in
subprocesses), ``e2e`` (greedy tokens against transformers on the same random weights),
``C`` (workload C, with its roofline ceiling), ``A`` (random 1024 -> 128), ``latency``
(128 -> 256 at batch 1 and 32), ``attention`` (decode attention bandwidth), ``vllm``
(vLLM on the same workloads, see benchmarks/gpu/vllm_runs.py), ``serve`` (kvplane's and
vLLM's servers side by side, driven by both clients: benchmarks/gpu/serve_compare.py). Results go to
``$OUT/gpu_suite.json`` (rewritten after every section) and ``$OUT/gpu_suite.log``.

    python3 benchmarks/gpu_suite.py                      # default sections, both models
    python3 benchmarks/gpu_suite.py --quick --sections env,e2e,C
    python3 benchmarks/gpu_suite.py --sections vllm --vllm-runs C,A-qwen,lat1-qwen

See docs/benchmarks.md ("GPU suite") for what each section measures.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib.util
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu import summary
from benchmarks.gpu.common import EngineCache, Suite, Tee, bootstrap_kvplane
from benchmarks.gpu.vllm_runs import ALL_RUNS, DEFAULT_RUNS

SECTIONS = ("env", "tests", "e2e", "C", "A", "latency", "attention", "vllm", "serve")
DEFAULT_SECTIONS = SECTIONS[:-2]
DEFAULT_MODELS = ("qwen3-0.6b", "llama-3-8b")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sections",
        default=None,
        help=f"comma list of {','.join(SECTIONS)} "
        "or 'all' (default: all but vllm; vllm too when it is importable)",
    )
    parser.add_argument(
        "--models",
        default=",".join(DEFAULT_MODELS),
        help="built-in model shapes for e2e, A and latency",
    )
    parser.add_argument("--quick", action="store_true", help="fewer prompts: a smoke run")
    parser.add_argument(
        "--out",
        default=os.environ.get("OUT") or ".out",
        help="output folder (default $OUT, else ./.out)",
    )
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--time-budget",
        type=float,
        default=None,
        metavar="S",
        help="skip sections that would start after S seconds",
    )
    engine = parser.add_argument_group("engine (C, A, latency)")
    engine.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    engine.add_argument("--max-num-seqs", type=int, default=None, help="default: the engine's")
    engine.add_argument(
        "--max-num-batched-tokens", type=int, default=None, help="default: the engine's"
    )
    engine.add_argument(
        "--max-model-len", type=int, default=4096, help="4096, as vllm_nano.py sets for vLLM"
    )
    engine.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    engine.add_argument(
        "--max-mixed-graph-tokens",
        type=int,
        default=512,
        help="largest mixed step replayed from a graph (0: mixed steps eager)",
    )
    engine.add_argument(
        "--async-scheduling",
        choices=("auto", "on", "off"),
        default="auto",
        help="overlap host and device steps (auto: where the platform is asynchronous)",
    )
    engine.add_argument("--disable-prefix-caching", action="store_true")
    engine.add_argument(
        "--decode-merge",
        choices=("fused", "separate"),
        default="fused",
        help="cuda-triton split-KV decode: merge the partitions in the split kernel or in a "
        "second launch",
    )
    parser.add_argument(
        "--weights-dir",
        default=None,
        help="where e2e saves weights (default: /dev/shm if roomy, else tmp)",
    )
    parser.add_argument("--tests-timeout", type=float, default=300.0, help="per pytest run")
    parser.add_argument(
        "--attention-backends",
        default="triton",
        help="triton and/or reference (the core's torch reference)",
    )
    parser.add_argument(
        "--no-attention-graphs", action="store_true", help="time decode attention eagerly only"
    )
    vllm = parser.add_argument_group("vLLM (separate, slow to start: ~60 s per run)")
    vllm.add_argument("--vllm", action="store_true", help="add the vllm section")
    vllm.add_argument("--vllm-runs", default=DEFAULT_RUNS, help=f"from {','.join(ALL_RUNS)}")
    vllm.add_argument("--vllm-site", default="/tmp/site")
    vllm.add_argument("--vllm-models-dir", default="/tmp/models")
    vllm.add_argument("--vllm-nano-script", default=".vl3/vllm_nano.py")
    vllm.add_argument("--vllm-timeout", type=float, default=420.0)
    vllm.add_argument(
        "--kvplane-results",
        default=None,
        metavar="FILE",
        help="an earlier gpu_suite.json whose kvplane figures the vLLM ratios use",
    )
    serve = parser.add_argument_group("serve: kvplane's and vLLM's servers, both clients")
    serve.add_argument("--serve-model", default="/tmp/models/qwen3-0.6b")
    serve.add_argument("--serve-rates", default="inf,40", help="request rates, in order")
    serve.add_argument("--serve-runs", type=int, default=3, help="rounds per rate")
    serve.add_argument("--serve-prompts", type=int, default=500)
    serve.add_argument(
        "--serve-kvplane-args", default="", help="more `kvplane serve` options, one string"
    )
    serve.add_argument(
        "--serve-seconds",
        type=float,
        default=500.0,
        help="from the suite's start: start no round that would end after S seconds",
    )
    args = parser.parse_args(argv)

    if args.sections in (None, "all"):
        auto_vllm = args.sections == "all" or importlib.util.find_spec("vllm") is not None
        args.sections = list(SECTIONS[:-1] if auto_vllm else DEFAULT_SECTIONS)
    else:
        args.sections = _split(args.sections)
    if args.vllm and "vllm" not in args.sections:
        args.sections.append("vllm")
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; known: {', '.join(SECTIONS)}")
    args.models = _split(args.models)
    args.vllm_runs = _split(args.vllm_runs)
    args.attention_backends = _split(args.attention_backends)
    args.serve_rates = _split(args.serve_rates)
    return args


def _split(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def run_section(suite: Suite, name: str, fn: Callable[[], Any], model: str | None = None) -> None:
    """Run one section (or one model of a per-model section), recording its result or
    traceback and its time; rewrite the JSON file afterwards."""
    sections = suite.results["sections"]
    entry = sections.setdefault(name, {"status": "running", "seconds": 0.0})
    budget = suite.args.time_budget
    if budget is not None and suite.elapsed() > budget:
        outcome: dict[str, Any] = {"status": "skipped", "reason": f"time budget {budget} s spent"}
    else:
        print(f"\n===== {name}{f' ({model})' if model else ''} =====", flush=True)
        started = time.perf_counter()
        try:
            outcome = {"status": "ok", "result": fn()}
        except Exception:
            outcome = {"status": "error", "error": traceback.format_exc()}
            print(outcome["error"], flush=True)
        entry["seconds"] += time.perf_counter() - started
    if model is None:
        entry.update(outcome)
    else:  # per-model sections: results by model, the section ok only if every model is
        entry.setdefault("result", {})[model] = outcome.get("result") or outcome
        worst = {"ok": 0, "skipped": 1, "error": 2}
        previous = entry["status"] if entry["status"] != "running" else "ok"
        entry["status"] = max(previous, outcome["status"], key=worst.__getitem__)
    suite.write_json()


def run_all(suite: Suite) -> None:
    from benchmarks.gpu import (
        attention_bw,
        e2e,
        env,
        serve_compare,
        tests_run,
        vllm_runs,
        workloads,
    )

    args, wanted = suite.args, suite.args.sections
    suite.engines = EngineCache(suite)
    plan: list[tuple[str, Callable[[], Any], str | None]] = []
    if "env" in wanted:
        plan.append(("env", lambda: env.run_env(suite), None))
    if "tests" in wanted:
        plan.append(("tests", lambda: tests_run.run_tests(suite), None))
    if "e2e" in wanted:
        plan.append(("e2e", lambda: e2e.run_e2e(suite), None))
    if "C" in wanted:
        plan.append(("C", lambda: workloads.run_c(suite), None))
    # Model by model, so A and latency share one engine; C's model first (already loaded).
    models = sorted(args.models, key=lambda m: m != workloads.C_MODEL)
    for model in models:
        for name, fn in (("A", workloads.run_a), ("latency", workloads.run_latency)):
            if name in wanted:
                plan.append((name, functools.partial(fn, suite, model), model))
    if "attention" in wanted:
        plan.append(("attention", lambda: attention_bw.run_attention(suite), None))
    if "vllm" in wanted:
        plan.append(("vllm", lambda: vllm_runs.run_vllm(suite), None))
    if "serve" in wanted:
        plan.append(("serve", lambda: serve_compare.run_serve(suite), None))
    for index, (name, section, model) in enumerate(plan):
        run_section(suite, name, section, model)
        upcoming = {step[0] for step in plan[index + 1 :]}
        if not upcoming & {"C", "A", "latency"}:
            suite.engines.release()  # attention and vLLM want the memory back


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out_dir = Path(args.out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    log = (out_dir / "gpu_suite.log").open("a", buffering=1)
    # sys.__stdout__ is None only without a console; then the current stream stands in.
    sys.stdout = Tee(sys.__stdout__ or sys.stdout, log)
    sys.stderr = Tee(sys.__stderr__ or sys.stderr, log)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        force=True,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TQDM_MININTERVAL", "10")  # fewer progress lines in the log
    if args.device == "cuda":
        os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels, not the interpreter
    results: dict[str, Any] = {
        "suite": "kvplane-gpu-suite",
        "schema": 1,
        "started_at": _now(),
        "finished_at": None,
        "argv": sys.argv,
        "options": vars(args),
        "sections": {},
    }
    suite = Suite(args=args, out_dir=out_dir, results=results)
    print(f"kvplane GPU suite: sections {args.sections}, models {args.models}, out {out_dir}")
    try:
        fused_decode_merge = args.device != "cuda" or args.decode_merge == "fused"
        results["bootstrap"] = bootstrap_kvplane(fused_decode_merge)
        import torch

        if args.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("no CUDA device: this suite needs a GPU (--device cuda)")
        run_all(suite)
    except Exception:
        results["fatal_error"] = traceback.format_exc()
        print(results["fatal_error"], flush=True)
    results["finished_at"] = _now()
    results["total_seconds"] = suite.elapsed()
    results["summary"] = summary.summary_lines(results)
    suite.write_json()
    print("\n" + "\n".join(results["summary"]), flush=True)
    return 1 if "fatal_error" in results else 0


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


if __name__ == "__main__":
    raise SystemExit(main())
