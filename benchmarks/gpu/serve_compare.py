"""Section ``serve``: kvplane's server against vLLM's on one GPU, the same clients on both.

Both servers run at once on the same model folder with dummy weights (vLLM first, with
``--gpu-memory-utilization 0.45``; kvplane then takes what the target leaves, about as
much KV cache). Each round drives vLLM's server, then kvplane's, with ``vllm bench
serve``, and then both with ``kvplane bench serve`` (random 1024 -> 128, every request
to its full length), so the engines alternate; medians over the rounds are reported.

Needs vLLM importable from ``--vllm-site`` (see ../shared/tools/vllm-baseline/README.md)
and kvplane's server wheels on this process's path; vLLM's site folder stays out of
kvplane's server and client.
"""

from __future__ import annotations

import json
import os
import shlex
import statistics
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks.gpu.common import Suite

VLLM_PORT, KVPLANE_PORT = 8012, 8013
SERVED_NAME = "qwen"
#: Keys of ``vllm bench serve``'s result file, and the names kvplane's client uses.
VLLM_KEYS = {
    "output_throughput": "output_throughput",
    "mean_ttft_ms": "mean_ttft_ms",
    "p99_ttft_ms": "p99_ttft_ms",
    "mean_tpot_ms": "mean_tpot_ms",
    "p99_tpot_ms": "p99_tpot_ms",
}


def run_serve(suite: Suite) -> dict[str, Any]:
    args = suite.args
    out = Path(args.out)
    model = args.serve_model
    vllm_env = os.environ | {
        "PYTHONPATH": args.vllm_site,
        "VLLM_USE_FLASHINFER_SAMPLER": "0",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    kvplane_env = dict(os.environ)
    servers = [
        _start(
            "vllm",
            [
                *_server_command("vllm.entrypoints.cli.main", model, VLLM_PORT),
                "--gpu-memory-utilization",
                "0.45",
            ],
            vllm_env,
            VLLM_PORT,
            out,
        ),
    ]
    try:
        servers.append(
            _start(
                "kvplane",
                [
                    *_server_command("kvplane.cli.main", model, KVPLANE_PORT),
                    "--device",
                    "cuda",
                    "--no-access-log",
                    "--uvicorn-log-level",
                    "warning",
                    *shlex.split(args.serve_kvplane_args),
                ],
                kvplane_env,
                KVPLANE_PORT,
                out,
            )
        )
        ports = {"vllm": VLLM_PORT, "kvplane": KVPLANE_PORT}
        for name, port in ports.items():  # first requests compile and capture: not measured
            _vllm_client(port, "inf", 64, out / f"serve_warmup_{name}.json", vllm_env, model)
        runs: list[dict[str, Any]] = []
        # The suite's clock: no round starts that would end after --serve-seconds, judged
        # by the last round of the same rate (the servers' start counts too).
        deadline = suite.started + args.serve_seconds
        for rate in args.serve_rates:
            round_seconds = 0.0
            for round_index in range(args.serve_runs):
                round_started = time.perf_counter()
                if round_started + round_seconds > deadline:
                    print(f"[serve] rate {rate}: {round_index} rounds, out of time", flush=True)
                    break
                for server, port in ports.items():
                    path = out / f"serve_vllmclient_{server}_{rate}_{round_index}.json"
                    result = _client_run(
                        _vllm_client, port, rate, args.serve_prompts, path, vllm_env, model
                    )
                    runs.append({"client": "vllm", "server": server, "rate": rate, **result})
                    print(f"[serve] vllm client -> {server}, rate {rate}: {result}", flush=True)
                for server, port in ports.items():
                    path = out / f"serve_kvclient_{server}_{rate}_{round_index}.json"
                    result = _client_run(
                        _kvplane_client, port, rate, args.serve_prompts, path, model
                    )
                    runs.append({"client": "kvplane", "server": server, "rate": rate, **result})
                    print(f"[serve] kvplane client -> {server}, rate {rate}: {result}", flush=True)
                round_seconds = time.perf_counter() - round_started
        return {"runs": runs, "medians": _medians(runs)}
    finally:
        for server in servers:
            server.terminate()
        for server in servers:
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
        _pack(out)


def _pack(out: Path) -> None:
    """The servers' logs and every client run's result in one archive: the device hands
    back only a few files."""
    files = sorted(out.glob("serve_*.json")) + sorted(out.glob("serve_*.log"))
    if not files:
        return
    with tarfile.open(out / "serve_files.tar.gz", "w:gz") as archive:
        for path in files:
            archive.add(path, arcname=path.name)
    for path in files:
        path.unlink()


def _server_command(module: str, model: str, port: int) -> list[str]:
    return [
        *(sys.executable, "-m", module, "serve", model, "--load-format", "dummy"),
        *("--port", str(port), "--served-model-name", SERVED_NAME, "--max-model-len", "4096"),
    ]


def _start(name: str, command: list[str], env: dict[str, str], port: int, out: Path) -> Any:
    log = (out / f"serve_{name}.log").open("w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    started = time.monotonic()
    while time.monotonic() - started < 400:
        if process.poll() is not None:
            raise RuntimeError(f"{name} server exited ({process.returncode}); see {log.name}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
                if answer.status == 200:
                    print(f"[serve] {name} up in {time.monotonic() - started:.0f} s", flush=True)
                    return process
        except OSError:
            time.sleep(1)
    process.kill()
    raise RuntimeError(f"{name} server not up in 400 s")


def _client_run(client: Any, *client_args: Any) -> dict[str, Any]:
    """One client run; a failed run is recorded with its output's tail, and the rounds go on."""
    try:
        return dict(client(*client_args))
    except subprocess.CalledProcessError as error:
        tail = (error.stderr or b"")[-2000:].decode(errors="replace")
        print(f"[serve] client failed: {tail}", flush=True)
        return {"error": f"exit {error.returncode}: {tail}"}
    except (subprocess.TimeoutExpired, OSError, ValueError, KeyError) as error:
        print(f"[serve] client failed: {error!r}", flush=True)
        return {"error": repr(error)}


def _vllm_client(
    port: int, rate: str, num_prompts: int, path: Path, env: dict[str, str], model: str
) -> dict[str, float]:
    command = [sys.executable, "-m", "vllm.entrypoints.cli.main", "bench", "serve"]
    command += ["--base-url", f"http://127.0.0.1:{port}", "--model", SERVED_NAME]
    command += ["--tokenizer", model, "--dataset-name", "random", "--random-input-len", "1024"]
    command += ["--random-output-len", "128", "--num-prompts", str(num_prompts), "--ignore-eos"]
    command += ["--request-rate", rate, "--seed", "0", "--save-result"]
    command += ["--result-dir", str(path.parent), "--result-filename", path.name]
    subprocess.run(command, env=env, check=True, capture_output=True, timeout=300)
    saved = json.loads(path.read_text())
    return {name: float(saved[key]) for name, key in VLLM_KEYS.items()}


def _kvplane_client(
    port: int, rate: str, num_prompts: int, path: Path, model: str
) -> dict[str, float]:
    command = [sys.executable, "-m", "kvplane.cli.main", "bench", "serve"]
    command += ["--base-url", f"http://127.0.0.1:{port}", "--model", model]
    command += ["--served-model-name", SERVED_NAME, "--dataset", "random"]
    command += ["--input-len", "1024", "--output-len", "128", "--num-prompts", str(num_prompts)]
    command += ["--request-rate", rate, "--output-json", str(path)]
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    saved = json.loads(path.read_text())
    return {name: float(saved[name]) for name in VLLM_KEYS if name in saved}


def _medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of each figure per (client, server, rate), and kvplane / vLLM ratios."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for run in runs:
        if "error" in run:
            continue
        groups.setdefault((run["client"], run["server"], run["rate"]), []).append(run)
    medians: dict[str, Any] = {}
    for (client, server, rate), group in groups.items():
        medians[f"{client}-client/{server}/{rate}"] = {
            name: statistics.median(run[name] for run in group)
            for name in VLLM_KEYS
            if all(name in run for run in group)
        } | {"runs": len(group)}
    for client in ("vllm", "kvplane"):
        for rate in {run["rate"] for run in runs}:
            ours = medians.get(f"{client}-client/kvplane/{rate}")
            theirs = medians.get(f"{client}-client/vllm/{rate}")
            if ours and theirs:
                medians[f"{client}-client/{rate}/ratio"] = {
                    name: ours[name] / theirs[name]
                    for name in VLLM_KEYS
                    if name in ours and name in theirs and theirs[name]
                }
    return medians
