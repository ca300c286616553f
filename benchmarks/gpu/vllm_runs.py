"""vLLM 0.26 on the same machine and workloads, each run a subprocess with a timeout.

vLLM is never a dependency: it is unpacked under ``--vllm-site`` (``/tmp/site``) by
``../shared/tools/vllm-baseline/setup_on_gpu.sh``, which also makes the model folders
(config + synthetic tokenizer) under ``--vllm-models-dir``; weights are ``dummy``.
Runs: ``C`` (``vllm_nano.py``), ``A-<m>`` (``bench throughput``, random 1024 -> 128),
``lat<N>-<m>`` (``bench latency``, 128 -> 256 at batch N), ``<m>`` = qwen | llama, and
``attn`` (vLLM's FlashAttention decode kernel on the attention section's inputs,
:mod:`benchmarks.gpu.vllm_attention`).
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from benchmarks.gpu.common import REPO_ROOT, Suite, run_logged, tail_lines

#: short name -> (suite model name, folder under --vllm-models-dir)
MODELS = {"qwen": ("qwen3-0.6b", "qwen3-0.6b"), "llama": ("llama-3-8b", "llama3-8b")}
DEFAULT_RUNS = "C,A-qwen,lat1-qwen,lat32-qwen,A-llama"
ALL_RUNS = (
    "C",
    "A-qwen",
    "A-llama",
    "lat1-qwen",
    "lat32-qwen",
    "lat1-llama",
    "lat32-llama",
    "attn",
)
THROUGHPUT_LINE = re.compile(
    r"Throughput: ([\d.]+) requests/s, ([\d.]+) total tokens/s, ([\d.]+) output tokens/s"
)


def run_vllm(suite: Suite) -> dict[str, Any]:
    args = suite.args
    if suite.engines is not None:
        suite.engines.release()  # vLLM wants the GPU memory to itself
    site = Path(args.vllm_site)
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(site)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    env.update(
        VLLM_USE_FLASHINFER_SAMPLER="0",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        TOKENIZERS_PARALLELISM="false",
    )
    result: dict[str, Any] = {"site": str(site), "runs": {}}
    for run in args.vllm_runs:
        try:
            result["runs"][run] = run_one(suite, run, env)
        except Exception as error:  # one bad run must not stop the others
            result["runs"][run] = {"error": f"{type(error).__name__}: {error}"}
        suite.partial("vllm", result)
        print(f"[vllm] {run}: {_brief(result['runs'][run])}", flush=True)
    return result


def run_one(suite: Suite, run: str, env: dict[str, str]) -> dict[str, Any]:
    args = suite.args
    out = suite.out_dir / "vllm"
    out.mkdir(parents=True, exist_ok=True)
    if run == "attn":
        return _run_attention(suite, out, env)
    if run == "C":
        model, folder = MODELS["qwen"]
    else:
        kind, _, short = run.partition("-")
        is_latency = kind.startswith("lat") and kind.removeprefix("lat").isdigit()
        if short not in MODELS or not (kind == "A" or is_latency):
            raise ValueError(f"unknown vLLM run {run!r}; known: {', '.join(ALL_RUNS)}")
        model, folder = MODELS[short]
    model_dir = Path(args.vllm_models_dir) / folder
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}/config.json missing: run setup_on_gpu.sh first")
    python = sys.executable
    cli = [python, "-m", "vllm.entrypoints.cli.main", "bench"]
    json_path = out / f"{run}.json"
    if run == "C":
        env = {**env, "OUT": str(out)}
        command = [python, str(nano_script(args.vllm_nano_script)), str(model_dir)]
    elif run.startswith("A-"):
        command = [
            *cli,
            "throughput",
            "--model",
            str(model_dir),
            "--load-format",
            "dummy",
            "--random-input-len",
            "1024",
            "--random-output-len",
            "128",
            "--num-prompts",
            "100" if args.quick else "500",
            "--output-json",
            str(json_path),
        ]
    else:
        batch_size = run.partition("-")[0].removeprefix("lat")
        command = [
            *cli,
            "latency",
            "--model",
            str(model_dir),
            "--load-format",
            "dummy",
            "--input-len",
            "128",
            "--output-len",
            "256",
            "--batch-size",
            batch_size,
            "--num-iters-warmup",
            "2",
            "--num-iters",
            "2" if args.quick else "4",
            "--output-json",
            str(json_path),
        ]
    done = run_logged(command, out / f"{run}.log", args.vllm_timeout, env)
    done["model"] = model
    log = Path(done["log"])
    if done["returncode"] != 0:
        done["tail"] = tail_lines(log, 40)
        return done
    if run == "C":
        done["result"] = _nano_result(log, out / "vllm_nano.json")
    elif run.startswith("A-"):
        done["result"] = _throughput_result(log, json_path)
    else:
        done["result"] = json.loads(json_path.read_text())
    done["comparison"] = compare(suite, run, done["result"])
    return done


def _run_attention(suite: Suite, out: Path, env: dict[str, str]) -> dict[str, Any]:
    json_path = out / "attn.json"
    command = [sys.executable, "-m", "benchmarks.gpu.vllm_attention", "--out", str(json_path)]
    done = run_logged(command, out / "attn.log", suite.args.vllm_timeout, env)
    if done["returncode"] != 0:
        done["tail"] = tail_lines(Path(done["log"]), 40)
        return done
    done["result"] = json.loads(json_path.read_text())
    done["comparison"] = compare_attention(suite, done["result"])
    return done


def compare_attention(suite: Suite, vllm: dict[str, Any]) -> dict[str, Any] | None:
    """kvplane / vLLM per-layer bandwidth of decode attention, per ``b<batch>/<context>``."""
    entry = kvplane_sections(suite).get("attention") or {}
    if entry.get("status") != "ok":
        return None
    backend = entry["result"]["backends"].get("triton") or {}
    ours = {(row["batch"], row["context"]): row for row in backend.get("rows", [])}
    ratios = {}
    for row in vllm["rows"]:
        mine = ours.get((row["batch"], row["context"]))
        if mine and "layers_GBps" in mine and "layers_GBps" in row:
            ratios[f"b{row['batch']}/{row['context']}"] = mine["layers_GBps"] / row["layers_GBps"]
    return {"layers_GBps_ratio": ratios}


def nano_script(path: str) -> Path:
    for candidate in (Path(path), REPO_ROOT.parent / "shared/tools/vllm-baseline/vllm_nano.py"):
        resolved = candidate if candidate.is_absolute() else REPO_ROOT / candidate
        if resolved.is_file():
            return resolved
    raise FileNotFoundError(f"{path} not found (the lead copies vllm_nano.py to .vl3/)")


def _nano_result(log: Path, json_path: Path) -> dict[str, Any]:
    if json_path.is_file():
        return json.loads(json_path.read_text())
    for line in reversed(log.read_text(errors="replace").splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line.removeprefix("RESULT "))
    raise ValueError("vllm_nano.py printed no RESULT line")


def _throughput_result(log: Path, json_path: Path) -> dict[str, Any]:
    """vLLM's JSON has no output tokens/s: that comes from its printed summary line."""
    result = json.loads(json_path.read_text())
    match = THROUGHPUT_LINE.search(log.read_text(errors="replace"))
    if match:
        result["output_tokens_per_second"] = float(match.group(3))
    return result


def compare(suite: Suite, run: str, vllm: dict[str, Any]) -> dict[str, Any] | None:
    """kvplane / vLLM ratios from this run's kvplane sections, where they measured the
    same workload (>1 means kvplane is faster, except for latency ratios)."""
    sections = kvplane_sections(suite)

    def kvplane(section: str) -> Any:
        entry = sections.get(section) or {}
        return entry.get("result") if entry.get("status") == "ok" else None

    if run == "C":
        ours = kvplane("C")
        if not ours or ours["num_requests"] != 256:
            return None
        return {
            "output_tokens_per_s_ratio": ours["kvplane"]["output_tokens_per_second"]
            / vllm["out_tok_s"]
        }
    kind, _, short = run.partition("-")
    model = MODELS[short][0]
    if kind == "A":
        ours = (kvplane("A") or {}).get(model)
        if not ours or "kvplane" not in ours or "output_tokens_per_second" not in vllm:
            return None
        mine = ours["kvplane"]
        return {
            "requests_per_s_ratio": mine["requests_per_second"] / vllm["requests_per_second"],
            "total_tokens_per_s_ratio": mine["tokens_per_second"] / vllm["tokens_per_second"],
            "output_tokens_per_s_ratio": mine["output_tokens_per_second"]
            / vllm["output_tokens_per_second"],
        }
    ours = ((kvplane("latency") or {}).get(model) or {}).get(f"bs{kind.removeprefix('lat')}")
    if not ours:
        return None
    return {
        "latency_ratio_kvplane_over_vllm": ours["avg_latency"] / vllm["avg_latency"],
        "speedup_vs_vllm": vllm["avg_latency"] / ours["avg_latency"],
    }


def kvplane_sections(suite: Suite) -> dict[str, Any]:
    """This run's kvplane sections, completed by those of ``--kvplane-results FILE`` (a
    previous run's JSON, e.g. when vLLM runs in a command of its own)."""
    sections = dict(suite.results.get("sections", {}))
    path = getattr(suite.args, "kvplane_results", None)
    if path:
        earlier = json.loads(Path(path).read_text()).get("sections", {})
        for name, entry in earlier.items():
            if (sections.get(name) or {}).get("status") != "ok":
                sections[name] = entry
    return sections


def _brief(run: dict[str, Any]) -> str:
    if "error" in run:
        return f"error: {run['error']}"
    if run.get("returncode"):
        return f"exit {run['returncode']} (timed out: {run['timed_out']}), log {run['log']}"
    return f"{run.get('result')} ratios {run.get('comparison')} ({run['seconds']:.0f} s)"
