"""kvplane against vLLM offline, alternated: rounds of one process per engine, each running
the same workloads on the same prompts, so a ratio comes from one machine and one run.

Workloads (token-id prompts from :mod:`kvplane.bench.datasets`, written once by this
driver to a file both engines' workers read; ``ignore_eos``):

- ``A``: 500 random prompts of 1024 tokens, 128 new tokens each, temperature 1.0 (what
  ``vllm bench throughput --dataset-name random`` runs);
- ``C``: nano-vllm's bench, 256 prompts of U[100, 1024] tokens making U[100, 1024] tokens,
  temperature 0.6 (``../shared/tools/vllm-baseline/vllm_nano.py``).

A worker process builds its engine (``load_format="dummy"``, bf16, ``max_model_len``
4096, the engine's other defaults), runs one small warm-up ``generate`` (both engines the
same one), then each workload ``--repeats`` times (default once), timing ``generate``
alone. The engines take turns as the first of a round. vLLM runs from ``--vllm-site``
(``setup_on_gpu.sh`` unpacks it to ``/tmp/site``), kvplane from the ``PYTHONPATH`` this
script is started with.

Usage on the GPU machine (after ``.vl3/setup_on_gpu.sh``)::

    python3 benchmarks/gpu/offline_rounds.py --model-dir /tmp/models/qwen3-0.6b --rounds 3

Writes ``offline_rounds.json`` (every run, the medians and kvplane / vLLM per workload)
and one log per run under ``--out`` (default ``$OUT``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ENGINES = ("vllm", "kvplane")
WORKLOADS = ("A", "C")
MAX_MODEL_LEN = 4096
RESULT_PREFIX = "RESULT "


# -- prompts (the same for both engines) ------------------------------------------------------


Request = tuple[list[int], int, float]  # (prompt token ids, new tokens, temperature)
#: Sampling temperature of each workload's requests.
TEMPERATURES = {"A": 1.0, "C": 0.6}


def workload_requests(name: str) -> list[Request]:
    """Every request of workload ``name``, from kvplane's benchmark datasets (A: vLLM's
    random dataset over 10,000 ids; C: the nano bench, what vllm_nano.py draws)."""
    from kvplane.bench.datasets import nano_requests, random_requests

    if name == "A":
        requests = random_requests(500, 1024, 128, vocab_size=10_000, seed=0)
    elif name == "C":
        requests = nano_requests(256, seed=0)
    else:
        raise ValueError(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}")
    return [(r.prompt_token_ids, r.output_len, TEMPERATURES[name]) for r in requests]


def warm_up_requests() -> list[Request]:
    """64 short prompts making 1..64 tokens, and two long ones (every small batch size and
    the long-prefill paths run once before anything is timed)."""
    rng = random.Random(1)
    short = [([rng.randrange(10_000) for _ in range(4)], n + 1, 1.0) for n in range(64)]
    long = [([rng.randrange(10_000) for _ in range(2048)], 2, 1.0) for _ in range(2)]
    return short + long


def write_requests(path: Path, workloads: list[str]) -> None:
    """The warm-up and each workload's requests, as JSON the workers of both engines read
    (vLLM's worker cannot import kvplane: it runs on vLLM's packages alone)."""
    requests = {"warm-up": warm_up_requests()}
    requests.update({name: workload_requests(name) for name in workloads})
    path.write_text(json.dumps(requests))


def read_requests(path: Path) -> dict[str, list[Request]]:
    loaded = json.loads(path.read_text())
    return {name: [(ids, n, t) for ids, n, t in items] for name, items in loaded.items()}


# -- workers (one engine, one process) ----------------------------------------------------


def run_worker(
    engine: str, model_dir: str, requests_path: Path, device: str, options: str, repeats: int
) -> None:
    """Build ``engine`` once (``options``: its further ``LLM(...)`` arguments, JSON), warm
    it up, time each workload ``repeats`` times; print one RESULT line each time."""
    if engine == "vllm":
        generate = _vllm_generate(model_dir, json.loads(options))
    else:
        generate = _kvplane_generate(model_dir, device, json.loads(options))
    workloads = read_requests(requests_path)
    generate(workloads.pop("warm-up"))
    for repeat in range(repeats):
        for name, requests in workloads.items():
            started = time.perf_counter()
            num_out = generate(requests)
            seconds = time.perf_counter() - started
            result = {"engine": engine, "workload": name, "seconds": seconds, "repeat": repeat}
            result.update(out_tokens=num_out, out_tok_s=num_out / seconds)
            print(RESULT_PREFIX + json.dumps(result), flush=True)


def _vllm_generate(model_dir: str, options: dict[str, Any]) -> Any:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model_dir, load_format="dummy", max_model_len=MAX_MODEL_LEN, **options)

    def generate(requests: list[tuple[list[int], int, float]]) -> int:
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids, _, _ in requests]
        params = [
            SamplingParams(temperature=t, ignore_eos=True, max_tokens=n) for _, n, t in requests
        ]
        outputs = llm.generate(prompts, params, use_tqdm=False)
        return sum(len(output.outputs[0].token_ids) for output in outputs)

    return generate


def _kvplane_generate(model_dir: str, device: str, options: dict[str, Any]) -> Any:
    from kvplane import LLM, SamplingParams

    llm = LLM(model_dir, load_format="dummy", device=device, max_model_len=MAX_MODEL_LEN, **options)

    def generate(requests: list[tuple[list[int], int, float]]) -> int:
        prompts = [{"prompt_token_ids": ids} for ids, _, _ in requests]
        params = [
            SamplingParams(temperature=t, ignore_eos=True, max_tokens=n, detokenize=False)
            for _, n, t in requests
        ]
        outputs = llm.generate(prompts, params)
        return sum(len(output.outputs[0].token_ids) for output in outputs)

    return generate


# -- the driver ---------------------------------------------------------------------------


def worker_env(engine: str, vllm_site: str) -> dict[str, str]:
    """vLLM sees its own site only (its pins must not meet kvplane's wheels); kvplane the
    environment this script was started with."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if engine == "vllm":
        env.update(
            PYTHONPATH=vllm_site,
            VLLM_USE_FLASHINFER_SAMPLER="0",
            VLLM_NO_USAGE_STATS="1",
            DO_NOT_TRACK="1",
        )
    return env


def run_round(
    args: argparse.Namespace, engine: str, index: int, requests_path: Path
) -> list[dict[str, Any]]:
    """One worker process; its RESULT lines, or one error entry per workload."""
    log = Path(args.out) / f"offline_{engine}_{index}.log"
    command = [sys.executable, __file__, "--worker", engine, "--model-dir", args.model_dir]
    command += ["--requests", str(requests_path), "--kvplane-device", args.kvplane_device]
    options = args.vllm_options if engine == "vllm" else args.kvplane_options
    command += ["--worker-options", options, "--repeats", str(args.repeats)]
    started = time.perf_counter()
    with log.open("w") as handle:
        try:
            subprocess.run(
                command, stdout=handle, stderr=subprocess.STDOUT, timeout=args.timeout,
                env=worker_env(engine, args.vllm_site), check=False,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            pass
    wall = time.perf_counter() - started
    lines = log.read_text(errors="replace").splitlines()
    results = [
        json.loads(line[len(RESULT_PREFIX) :]) for line in lines if line.startswith(RESULT_PREFIX)
    ]
    for result in results:
        result.update(round=index, process_seconds=wall)
    missing = set(args.workloads) - {result["workload"] for result in results}
    for name in sorted(missing):
        results.append({"engine": engine, "workload": name, "round": index, "error": lines[-15:]})
    return results


def summarize(runs: list[dict[str, Any]], workloads: list[str]) -> dict[str, Any]:
    """Median output tok/s per engine and workload, and kvplane / vLLM of the medians."""
    summary: dict[str, Any] = {}
    for name in workloads:
        row: dict[str, Any] = {}
        for engine in ENGINES:
            rates = [
                r["out_tok_s"]
                for r in runs
                if r["engine"] == engine and r["workload"] == name and "out_tok_s" in r
            ]
            row[engine] = {
                "runs": [round(rate) for rate in rates],
                "median": statistics.median(rates) if rates else None,
            }
        if row["vllm"]["median"] and row["kvplane"]["median"]:
            row["kvplane_over_vllm"] = row["kvplane"]["median"] / row["vllm"]["median"]
        summary[name] = row
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", default="/tmp/models/qwen3-0.6b")
    parser.add_argument("--workloads", type=lambda s: s.split(","), default=list(WORKLOADS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--engines", type=lambda s: s.split(","), default=list(ENGINES))
    parser.add_argument("--vllm-site", default="/tmp/site")
    parser.add_argument("--kvplane-device", default="cuda", help="cpu: a smoke run")
    parser.add_argument(
        "--kvplane-options", default="{}", help="more kvplane LLM(...) options, as JSON"
    )
    parser.add_argument(
        "--vllm-options",
        default="{}",
        help='more vLLM LLM(...) options, e.g. {"quantization": "fp8"}',
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="timed runs of each workload per worker process"
    )
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds per worker")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--requests", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--worker-options", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        run_worker(
            args.worker,
            args.model_dir,
            args.requests,
            args.kvplane_device,
            args.worker_options,
            args.repeats,
        )
        return 0
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        requests_path = Path(folder) / "requests.json"
        write_requests(requests_path, args.workloads)
        report = run_rounds(args, requests_path)
    print(json.dumps(report["summary"], indent=1), flush=True)
    return 0


def run_rounds(args: argparse.Namespace, requests_path: Path) -> dict[str, Any]:
    """``args.rounds`` rounds, the engines taking turns as the first of a round."""
    runs: list[dict[str, Any]] = []
    report: dict[str, Any] = {
        "kvplane_options": json.loads(args.kvplane_options),
        "vllm_options": json.loads(args.vllm_options),
    }
    for index in range(args.rounds):
        order = args.engines if index % 2 == 0 else list(reversed(args.engines))
        for engine in order:
            for result in run_round(args, engine, index, requests_path):
                runs.append(result)
                rate = result.get("out_tok_s", "error")
                print(f"[round {index}] {engine} {result['workload']}: {rate}", flush=True)
            # Rewritten after every worker: a call cut short keeps what it measured.
            report.update(runs=runs, summary=summarize(runs, args.workloads))
            (Path(args.out) / "offline_rounds.json").write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    raise SystemExit(main())
