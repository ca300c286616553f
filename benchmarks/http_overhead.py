"""What the HTTP layer costs: `kvplane bench serve` (rate inf) over `kvplane bench throughput`.

Same model, same workload, same engine options, one after the other on this machine:
first the offline engine, then `kvplane serve` in a subprocess driven by the serving
benchmark. Prints both output tokens/s and their ratio; writes JSON with ``--output-json``.

    python benchmarks/http_overhead.py --num-prompts 64 --input-len 128 --output-len 64
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def kvplane(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "kvplane.cli.main", *args], check=True)


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("server not ready")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--engine-args", default="", help="extra engine flags for both runs")
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()

    from kvplane.models.source import default_model_path

    model = args.model or str(default_model_path())
    engine_args = ["--model", model, "--device", args.device, *args.engine_args.split()]
    workload = [
        "--input-len",
        str(args.input_len),
        "--output-len",
        str(args.output_len),
        "--num-prompts",
        str(args.num_prompts),
    ]
    work = Path(tempfile.mkdtemp())

    kvplane(
        "bench",
        "throughput",
        *engine_args,
        *workload,
        "--output-json",
        str(work / "throughput.json"),
    )
    offline = json.loads((work / "throughput.json").read_text())

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kvplane.cli.main",
            "serve",
            *engine_args,
            "--served-model-name",
            "bench",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--uvicorn-log-level",
            "warning",
        ]
    )
    try:
        wait_ready(url, server)
        serve_args = ["bench", "serve", "--base-url", url, "--model", model,
                      "--served-model-name", "bench"]  # fmt: skip
        # One short warm-up pass, as the offline benchmark warms up too.
        kvplane(*serve_args, "--input-len", "16", "--output-len", "4", "--num-prompts", "2")
        kvplane(*serve_args, *workload, "--request-rate", "inf",
                "--output-json", str(work / "serve.json"))  # fmt: skip
    finally:
        server.terminate()
        server.wait(timeout=120)
    serving = json.loads((work / "serve.json").read_text())

    ratio = serving["output_throughput"] / offline["output_tokens_per_second"]
    result = {
        "offline_output_tokens_per_second": offline["output_tokens_per_second"],
        "serve_output_tokens_per_second": serving["output_throughput"],
        "ratio": ratio,
        "workload": vars(args),
    }
    print(
        f"offline {offline['output_tokens_per_second']:.1f} out tok/s, "
        f"serve {serving['output_throughput']:.1f} out tok/s, ratio {ratio:.3f}"
    )
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
