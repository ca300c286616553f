"""The GPU suite's plumbing on the CPU: tiny models through every section, and the parts
that need no device (roofline, JUnit and vLLM output parsing) on known inputs.

Nothing GPU-specific is faked: on ``--device cpu`` the suite measures the CPU and tiny
models, and the tests section skips itself.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from benchmarks.gpu import roofline, tests_run, vllm_runs
from benchmarks.gpu.common import REPO_ROOT, Suite, bootstrap_kvplane
from benchmarks.gpu_suite import DEFAULT_SECTIONS, parse_args


@pytest.mark.slow
def test_cpu_smoke_run_writes_every_section(tmp_path: Path) -> None:
    out = tmp_path / "out"
    command = [
        sys.executable,
        str(REPO_ROOT / "benchmarks" / "gpu_suite.py"),
        "--device",
        "cpu",
        "--quick",
        "--out",
        str(out),
        "--sections",
        "env,tests,e2e,C,A,latency,attention,vllm",
        "--models",
        "qwen3-0.6b",
        "--attention-backends",
        "reference",
        "--vllm-models-dir",
        str(tmp_path / "no-models"),
        "--vllm-runs",
        "C,A-qwen",
    ]
    env = {**os.environ, "TRITON_INTERPRET": "1", "OUT": str(tmp_path / "unused")}
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    results = json.loads((out / "gpu_suite.json").read_text())
    sections = results["sections"]
    statuses = {name: entry["status"] for name, entry in sections.items()}
    assert statuses == dict.fromkeys(statuses, "ok"), {
        name: entry.get("error") for name, entry in sections.items()
    }
    assert set(statuses) == {"env", "tests", "e2e", "C", "A", "latency", "attention", "vllm"}
    assert results["finished_at"] and results["summary"]

    rates = sections["env"]["result"]["memory_rates"]
    assert rates["copy_read_write_GBps"] == pytest.approx(2 * rates["copy_one_way_GBps"])
    assert "skipped" in sections["tests"]["result"]

    e2e = sections["e2e"]["result"]
    assert set(e2e["cases"]) == {"qwen3-0.6b-bfloat16", "qwen3-0.6b-float32-2layers"}
    assert e2e["passed"], e2e
    for case in e2e["cases"].values():
        assert len(case["per_prompt"]) == e2e["num_prompts"]

    c = sections["C"]["result"]
    assert c["kvplane"]["total_output_tokens"] == c["expected_output_tokens"]
    assert c["roofline"]["ceiling_output_tokens_per_s"] > 0
    assert 0 < c["fraction_of_ceiling"]
    assert c["engine"]["max_num_seqs"] == 256

    assert sections["A"]["result"]["qwen3-0.6b"]["kvplane"]["total_output_tokens"] == 8 * 16
    latency = sections["latency"]["result"]["qwen3-0.6b"]
    assert {"bs1", "bs4"} <= set(latency)

    rows = sections["attention"]["result"]["backends"]["reference"]["rows"]
    assert rows and all("eager_GBps" in row for row in rows), rows

    runs = sections["vllm"]["result"]["runs"]
    assert all("config.json missing" in run["error"] for run in runs.values())
    log = (out / "gpu_suite.log").read_text()
    assert "section" in log and "e2e" in log


def test_default_sections_and_flags() -> None:
    args = parse_args(["--models", "qwen3-0.6b", "--vllm", "--vllm-runs", "C,lat1-qwen"])
    assert args.sections[: len(DEFAULT_SECTIONS)] == list(DEFAULT_SECTIONS)
    assert args.sections[-1] == "vllm"
    assert args.vllm_runs == ["C", "lat1-qwen"]
    assert parse_args(["--sections", "env,C"]).sections == ["env", "C"]
    with pytest.raises(SystemExit):
        parse_args(["--sections", "env,nope"])


def test_decode_merge_separate_registers_the_cuda_platform_with_that_backend() -> None:
    """``--decode-merge separate`` selects the merge through the platform's attention
    backend, registered in-process; no module state of the kernels changes."""
    cuda_plugin = pytest.importorskip("kvplane_cuda.plugin")
    import torch

    from kvplane.plugins import discovery
    from kvplane.plugins.types import AttentionSpec

    before = {platform.name: platform for platform in discovery.discover_platforms()}
    spec = AttentionSpec(
        num_heads=4, num_kv_heads=2, head_size=64, dtype=torch.float32, block_size=16, scale=1.0
    )
    try:
        done = bootstrap_kvplane(fused_decode_merge=False)
        cuda = {platform.name: platform for platform in discovery.discover_platforms()}["cuda"]
        assert done["cuda_decode_merge"] == "separate" and cuda.module is not None
        [backend] = cuda.module.kvplane_attention_backends(spec=spec)
        assert backend.name == "cuda-triton" and backend.fused_reduce is False
        assert cuda.module.kvplane_ops is cuda_plugin.kvplane_ops  # the other hooks as-is
    finally:
        discovery.unregister_platform("cuda")
        previous = before.get("cuda")
        if previous is not None and previous.distribution == "(in-process)" and previous.module:
            discovery.register_platform("cuda", previous.module, previous.version)


def test_roofline_by_hand() -> None:
    cost = roofline.ModelCost(
        weight_bytes=100, matmul_params=1, kv_bytes_per_token=1, attention_flops_per_key=0
    )
    result = roofline.simulate(
        [(10, 3)], cost, bandwidth=1.0, flops=1e30, max_num_seqs=8, max_num_batched_tokens=8192
    )
    # Prefill: weights once + 10 KV writes = 110; decodes over 11 then 12 keys: 111 + 112.
    assert result["prefill_seconds"] == pytest.approx(110)
    assert result["decode_seconds"] == pytest.approx(223)
    assert result["num_decode_steps"] == 2
    assert result["ceiling_output_tokens_per_s"] == pytest.approx(3 / 333)


def test_roofline_matches_the_published_estimate_for_workload_c() -> None:
    from kvplane.bench.datasets import nano_requests
    from kvplane.models.builtin_configs import builtin_config

    qwen = roofline.model_cost(builtin_config("qwen3-0.6b"))
    assert qwen.kv_bytes_per_token == 112 * 1024
    assert roofline.model_cost(builtin_config("llama-3-8b")).kv_bytes_per_token == 128 * 1024
    requests = [(len(r.prompt_token_ids), r.output_len) for r in nano_requests()]
    result = roofline.simulate(requests, qwen, 3.0e12, 790e12, 256, 8192)
    # performance.md: ~25-28k output tokens/s for workload C on an H100 at 3.0 TB/s.
    assert 24_000 < result["ceiling_output_tokens_per_s"] < 29_000
    assert result["memory_bound_steps"] == result["num_decode_steps"]


def test_run_pytest_counts_outcomes(tmp_path: Path) -> None:
    test_file = tmp_path / "test_sample.py"
    test_file.write_text(
        "import pytest\n"
        "def test_ok(): pass\n"
        "def test_bad(): assert False\n"
        "def test_skip(): pytest.skip('no')\n"
    )
    run = tests_run.run_pytest("sample", [str(test_file)], tmp_path / "logs", 120, dict(os.environ))
    assert run["counts"] == {"tests": 3, "failed": 1, "errors": 0, "skipped": 1, "passed": 1}
    assert [name.split("::")[-1] for name in run["failed_tests"]] == ["test_bad"]
    assert run["returncode"] == 1 and run["tail"]


def test_vllm_outputs_are_parsed_and_compared(tmp_path: Path) -> None:
    log = tmp_path / "a.log"
    log.write_text(
        "INFO ...\nThroughput: 26.50 requests/s, 30530.12 total tokens/s, 3392.00 output "
        "tokens/s\nTotal num prompt tokens:  512000\n"
    )
    json_path = tmp_path / "a.json"
    json_path.write_text(json.dumps({"requests_per_second": 26.5, "tokens_per_second": 30530.12}))
    vllm = vllm_runs._throughput_result(log, json_path)
    assert vllm["output_tokens_per_second"] == 3392.0

    ours = {
        "requests_per_second": 13.25,
        "tokens_per_second": 15265.06,
        "output_tokens_per_second": 1696.0,
    }
    results = {
        "sections": {
            "A": {"status": "ok", "result": {"llama-3-8b": {"kvplane": ours}}},
            "latency": {"status": "ok", "result": {"qwen3-0.6b": {"bs1": {"avg_latency": 1.0}}}},
            "C": {"status": "ok", "result": {"num_requests": 64, "kvplane": {}}},
        }
    }
    suite = Suite(args=argparse.Namespace(), out_dir=tmp_path, results=results)
    ratios = vllm_runs.compare(suite, "A-llama", vllm)
    assert ratios == pytest.approx(
        {
            "requests_per_s_ratio": 0.5,
            "total_tokens_per_s_ratio": 0.5,
            "output_tokens_per_s_ratio": 0.5,
        }
    )
    latency = vllm_runs.compare(suite, "lat1-qwen", {"avg_latency": 0.5})
    assert latency == pytest.approx(
        {"latency_ratio_kvplane_over_vllm": 2.0, "speedup_vs_vllm": 0.5}
    )
    assert vllm_runs.compare(suite, "C", {"out_tok_s": 1.0}) is None  # 64 != 256 sequences


def test_vllm_attention_rows_are_compared_per_layer(tmp_path: Path) -> None:
    rows = [
        {"batch": 1, "context": 8192, "layers_GBps": 1600.0},
        {"batch": 32, "context": 8192, "layers_GBps": 4000.0},
    ]
    results = {
        "sections": {
            "attention": {
                "status": "ok",
                "result": {"backends": {"triton": {"rows": rows}}},
            }
        }
    }
    suite = Suite(args=argparse.Namespace(), out_dir=tmp_path, results=results)
    vllm = {
        "rows": [
            {"batch": 1, "context": 8192, "layers_GBps": 3200.0},
            {"batch": 128, "context": 8192, "layers_GBps": 4400.0},  # kvplane has none
            {"batch": 32, "context": 8192, "error": "Traceback ..."},
        ]
    }
    assert vllm_runs.compare_attention(suite, vllm) == {"layers_GBps_ratio": {"b1/8192": 0.5}}
    assert "attn" in vllm_runs.ALL_RUNS


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton interpreter")
def test_decode_breakdown_probes_read_what_the_kernel_reads() -> None:
    """The ``stream`` probe gathers each partition's keys and values through the block
    table (checked against torch), so its time is the real kernel's traffic."""
    import torch
    from benchmarks.gpu.attention_bw import _decode_layer
    from benchmarks.gpu.decode_breakdown import breakdown, probe_launcher

    from kvplane.plugins.types import AttentionSpec
    from kvplane_cuda.kernels.decode_attention import decode_tile

    spec = AttentionSpec(
        num_heads=4, num_kv_heads=2, head_size=16, dtype=torch.float32, block_size=16, scale=0.25
    )
    context, num_splits = 100, 3
    layer = _decode_layer(spec, 2, context, "cpu")
    query, _, _, kv_cache, metadata = layer
    sums = probe_launcher(
        "stream", query, kv_cache, metadata.block_tables, metadata.seq_lens,
        metadata.query_start_loc, num_splits,
    )()  # fmt: skip
    # [seq, kv_head, split, head_size]: the probe's partition sums
    sums = sums.view(2, spec.num_kv_heads, num_splits, spec.head_size)
    block_n = decode_tile(spec.head_size, 2, 4).block_n  # keys per tile (float32)
    keys_per_split = math.ceil(math.ceil(context / block_n) / num_splits) * block_n
    for seq in range(2):
        slots = [int(metadata.block_tables[seq, p // 16]) * 16 + p % 16 for p in range(context)]
        keys = kv_cache[0].reshape(-1, spec.num_kv_heads, spec.head_size)[slots]
        values = kv_cache[1].reshape(-1, spec.num_kv_heads, spec.head_size)[slots]
        for split in range(num_splits):
            part = slice(split * keys_per_split, min((split + 1) * keys_per_split, context))
            expected = (keys[part] + values[part]).sum(0)  # [kv_heads, head_size]
            expected = expected + query[seq].view(spec.num_kv_heads, -1, 16).sum(1)
            torch.testing.assert_close(sums[seq, :, split], expected, rtol=1e-4, atol=1e-3)
    times = breakdown([layer], num_splits, lambda functions: [f() for f in functions] and 1e-6)
    assert set(times) == {"empty", "bookkeeping", "stream", "decode", "decode_separate"}


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton interpreter")
def test_kernel_sweeps_run_every_candidate() -> None:
    """The tile sweeps launch every candidate without error (on the interpreter, where
    warps and stages are ignored but tile sizes are not), and the copy moves its bytes."""
    import torch
    from benchmarks.gpu.attention_bw import _decode_layer
    from benchmarks.gpu.kernel_sweeps import (
        DECODE_CANDIDATES,
        PREFILL_CANDIDATES,
        copy_same_bytes,
        decode_tile_sweep,
        prefill_tile_sweep,
    )

    from kvplane.plugins.types import AttentionSpec

    def per_launch(functions: list) -> float:
        for function in functions:
            function()
        return 1e-6

    spec = AttentionSpec(
        num_heads=4, num_kv_heads=2, head_size=16, dtype=torch.float32, block_size=16, scale=0.25
    )
    layer = _decode_layer(spec, 1, 100, "cpu")
    decode = decode_tile_sweep([layer], 10_000, (1, 2), per_launch)
    assert len(decode) == 2 * len(DECODE_CANDIDATES)
    assert all(rate == pytest.approx(10_000 / 1e-6 / 1e9) for rate in decode.values()), decode
    prefill = prefill_tile_sweep(
        4, 2, 16, 16, torch.float32, per_launch, num_launches=1, shapes=((2, 20, 17),),
        device="cpu",
    )  # fmt: skip
    rates = prefill["s2q20c17"]
    assert len(rates) == 1 + len(PREFILL_CANDIDATES)
    assert all(isinstance(rate, float) and rate > 0 for rate in rates.values()), rates
    assert copy_same_bytes(4096, 2, per_launch, device="cpu") == {
        "us": pytest.approx(1.0),
        "read_write_GBps": pytest.approx(4096 / 1e-6 / 1e9),
    }
