"""Shared state of the GPU suite: options, results file, log, timers, models and engines.

The suite runs on a CUDA machine; ``--device cpu`` runs the same code paths on tiny
models (the smoke test), never with faked GPU figures.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, TextIO

REPO_ROOT = Path(__file__).resolve().parents[2]
#: Source folders used when kvplane is not installed (e.g. a bare GPU image).
SOURCE_PATHS = {
    "kvplane": REPO_ROOT / "core" / "src",
    "kvplane_cuda": REPO_ROOT / "platforms" / "cuda" / "src",
}
#: Cap on each subprocess log kept under $OUT (the tail is kept).
MAX_LOG_BYTES = 2 * 2**20

#: Tiny shapes that replace the real ones on ``--device cpu`` (same architectures).
TINY_SHAPE: dict[str, Any] = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=4096,
)


def bootstrap_kvplane(fused_decode_merge: bool = True) -> dict[str, Any]:
    """Make ``kvplane`` and ``kvplane_cuda`` importable and the ``cuda`` platform
    discoverable, installed or not. With ``fused_decode_merge=False`` the ``cuda``
    platform is registered in-process from :func:`cuda_plugin_with_separate_merge`
    (``--decode-merge separate``). Returns what was done (recorded in the JSON)."""
    done: dict[str, Any] = {"added_source_paths": [], "registered_cuda_in_process": False}
    for module, path in SOURCE_PATHS.items():
        if importlib.util.find_spec(module) is None:
            sys.path.insert(0, str(path))
            old = os.environ.get("PYTHONPATH")
            # The test subprocesses need the same paths.
            os.environ["PYTHONPATH"] = os.pathsep.join([str(path)] + ([old] if old else []))
            done["added_source_paths"].append(str(path))
    from kvplane.plugins.discovery import discover_platforms, register_platform

    if fused_decode_merge and "cuda" in {platform.name for platform in discover_platforms()}:
        return done
    try:
        import kvplane_cuda.plugin as cuda_plugin
    except ImportError as error:
        done["cuda_import_error"] = repr(error)
        return done
    if not fused_decode_merge:
        cuda_plugin = cuda_plugin_with_separate_merge()
        done["cuda_decode_merge"] = "separate"
    register_platform("cuda", cuda_plugin)  # in-process platforms win over entry points
    done["registered_cuda_in_process"] = True
    return done


def cuda_plugin_with_separate_merge() -> ModuleType:
    """A copy of the ``cuda`` platform's plugin module whose attention backend builds
    layers that merge the split-KV decode partitions in a second launch
    (``TritonAttentionBackend(fused_reduce=False)``); every other hook is the platform's."""
    import kvplane_cuda.plugin as cuda_plugin
    from kvplane.attention.backend import AttentionBackend
    from kvplane.plugins import hookimpl
    from kvplane.plugins.types import AttentionSpec
    from kvplane_cuda.attention import TritonAttentionBackend

    @hookimpl
    def kvplane_attention_backends(spec: AttentionSpec) -> list[AttentionBackend]:
        return [TritonAttentionBackend(fused_reduce=False)]

    module = ModuleType(f"{cuda_plugin.__name__}_separate_decode_merge")
    module.__dict__.update(
        (name, value) for name, value in vars(cuda_plugin).items() if not name.startswith("__")
    )
    module.kvplane_attention_backends = kvplane_attention_backends  # type: ignore[attr-defined]
    return module


class Tee:
    """A text stream writing to the console and the suite's log file."""

    def __init__(self, stream: TextIO, log: TextIO) -> None:
        self.stream = stream
        self.log = log

    def write(self, text: str) -> int:
        self.stream.write(text)
        self.log.write(text)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()
        self.log.flush()

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


@dataclass
class Suite:
    """Options, results and the resources sections share (measured bandwidth, engine)."""

    args: argparse.Namespace
    out_dir: Path
    results: dict[str, Any]
    started: float = field(default_factory=time.perf_counter)
    engines: EngineCache | None = None
    memory_rates: dict[str, Any] | None = None  # filled by the env section (or on demand)

    @property
    def device(self) -> str:
        return self.args.device

    @property
    def is_cuda(self) -> bool:
        return self.args.device == "cuda"

    def write_json(self) -> None:
        """Rewrite the results file atomically (called after every section)."""
        path = self.out_dir / "gpu_suite.json"
        temporary = path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(self.results, indent=2, default=str) + "\n")
        temporary.replace(path)

    def partial(self, section: str, result: dict[str, Any]) -> None:
        """Store a section's result so far and rewrite the JSON file (long sections call
        this as they go, so a timeout still leaves what was measured)."""
        self.results["sections"].setdefault(section, {"status": "running"})["result"] = result
        self.write_json()

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


# -- timing --------------------------------------------------------------------------------


def synchronize(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def median_seconds(fn: Callable[[], Any], device: str, warmup: int, iters: int) -> float:
    """Median time of ``fn`` over ``iters`` runs after ``warmup`` (CUDA events on a GPU)."""
    import torch

    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(iters):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000.0)
        else:
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
    return statistics.median(times)


# -- subprocesses --------------------------------------------------------------------------


def run_logged(
    command: list[str], log_path: Path, timeout: float, env: dict[str, str], cwd: Path = REPO_ROOT
) -> dict[str, Any]:
    """Run ``command`` in its own process group with output to ``log_path``; on timeout
    kill that group (children such as vLLM's engine process included)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    timed_out = False
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
        )
        try:
            returncode = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(process.pid, signal.SIGKILL)
            returncode = process.wait()
    _keep_tail(log_path)
    return {
        "command": " ".join(command),
        "returncode": returncode,
        "timed_out": timed_out,
        "seconds": time.perf_counter() - started,
        "log": str(log_path),
    }


def _keep_tail(path: Path) -> None:
    if path.stat().st_size > MAX_LOG_BYTES:
        data = path.read_bytes()[-MAX_LOG_BYTES:]
        path.write_bytes(b"[... truncated ...]\n" + data)


def tail_lines(path: Path, num_lines: int = 30) -> list[str]:
    if not path.exists():
        return []
    return path.read_text(errors="replace").splitlines()[-num_lines:]


# -- models and engines --------------------------------------------------------------------


def hf_config(name: str, device: str, **overrides: Any) -> Any:
    """The transformers config of built-in model ``name`` (tiny shapes on the CPU), with
    ``overrides``; built through the class so derived fields (layer types) stay consistent."""
    import transformers

    from kvplane.models.builtin_configs import BUILTIN_CONFIGS

    if name not in BUILTIN_CONFIGS:
        raise ValueError(f"unknown model {name!r}; built-in configs: {sorted(BUILTIN_CONFIGS)}")
    class_name, options = BUILTIN_CONFIGS[name]
    options = {**options, **(TINY_SHAPE if device == "cpu" else {}), **overrides}
    return getattr(transformers, class_name)(**options)


def engine_options(suite: Suite) -> dict[str, Any]:
    """Engine flags of the throughput and latency sections."""
    args = suite.args
    options: dict[str, Any] = dict(
        device=args.device,
        dtype="bfloat16" if suite.is_cuda else "float32",
        load_format="dummy",
        skip_tokenizer_init=True,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        enable_prefix_caching=not args.disable_prefix_caching,
        enforce_eager=args.enforce_eager,
        max_mixed_graph_tokens=args.max_mixed_graph_tokens,
        async_scheduling={"auto": None, "on": True, "off": False}[args.async_scheduling],
        seed=args.seed,
    )
    if suite.is_cuda:
        options["gpu_memory_utilization"] = args.gpu_memory_utilization
    else:
        options["kv_cache_memory_bytes"] = 64 * 2**20
    return options


class EngineCache:
    """Holds one kvplane ``LLM`` at a time, so sections of the same model share it and a
    new model first frees the previous one's device memory."""

    def __init__(self, suite: Suite) -> None:
        self.suite = suite
        self.name: str | None = None
        self.llm: Any = None
        self.info: dict[str, Any] = {}
        self.config_dir: str | None = None

    def get(self, name: str) -> tuple[Any, dict[str, Any]]:
        if self.name == name and self.llm is not None:
            return self.llm, self.info
        self.release()
        from kvplane import LLM

        options = engine_options(self.suite)
        model = name
        if not self.suite.is_cuda:  # a tiny config of the same architecture, in a folder
            model = self.config_dir = tempfile.mkdtemp(prefix=f"kvplane-suite-{name}-")
            hf_config(name, "cpu").save_pretrained(model)
        started = time.perf_counter()
        self.llm = LLM(model=model, **options)
        self.info = engine_info(self.llm, options, time.perf_counter() - started)
        self.name = name
        print(f"[engine] {name}: {json.dumps(self.info)}", flush=True)
        return self.llm, self.info

    def release(self) -> None:
        self.llm = None
        self.name = None
        if self.config_dir is not None:
            shutil.rmtree(self.config_dir, ignore_errors=True)
            self.config_dir = None
        free_memory(self.suite.device)


def engine_info(llm: Any, options: dict[str, Any], load_seconds: float) -> dict[str, Any]:
    """What performance.md asks every figure to carry: dtypes, cache, batch limits, graphs."""
    from kvplane.plugins import capabilities

    engine = llm.engine
    config = engine.config
    runner = engine.runner
    block_manager = engine.scheduler.block_manager
    has_graphs = engine.platform.has_capability(capabilities.GRAPH_CAPTURE)
    layers = runner.attention_layers
    return {
        "model": config.model,
        "platform": engine.platform.name,
        "dtype": str(engine.model_config.dtype).removeprefix("torch."),
        "kv_cache_dtype": str(runner.kv_caches[0].dtype).removeprefix("torch.")
        if runner.kv_caches
        else None,
        "block_size": config.block_size,
        "max_num_seqs": config.max_num_seqs,
        "max_num_batched_tokens": config.max_num_batched_tokens,
        "max_model_len": engine.model_config.max_model_len,
        "enable_prefix_caching": config.enable_prefix_caching,
        "enforce_eager": config.enforce_eager,
        "max_mixed_graph_tokens": config.max_mixed_graph_tokens,
        "async_scheduling": getattr(engine, "_overlap", None),
        "platform_graph_capture": has_graphs,
        # Step graphs are captured at engine start when platform and layers allow.
        "cuda_graphs": [graphs.step_kind for graphs in getattr(runner, "step_graphs", ())],
        "gpu_memory_utilization": options.get("gpu_memory_utilization"),
        "kv_cache_memory_bytes": options.get("kv_cache_memory_bytes"),
        "num_kv_blocks": block_manager.num_blocks,
        "kv_cache_tokens": block_manager.num_blocks * config.block_size,
        "attention_backend": layers[0].backend_name if layers else None,
        "load_seconds": load_seconds,
    }


def free_memory(device: str) -> None:
    """Drop unreferenced tensors and return cached device memory to the driver."""
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
        torch.cuda.empty_cache()
