"""The offline comparison's prompts and summary (the engines themselves run on the GPU)."""

from __future__ import annotations

from pathlib import Path

from benchmarks.gpu.offline_rounds import read_requests, summarize, write_requests

from kvplane.bench.datasets import nano_requests, random_requests


def test_workers_read_kvplanes_datasets_with_each_workloads_temperature(tmp_path: Path) -> None:
    path = tmp_path / "requests.json"
    write_requests(path, ["A", "C"])
    requests = read_requests(path)
    assert list(requests) == ["warm-up", "A", "C"]
    expected_a = random_requests(500, 1024, 128, vocab_size=10_000, seed=0)
    assert requests["A"] == [(r.prompt_token_ids, r.output_len, 1.0) for r in expected_a]
    expected_c = nano_requests(256, seed=0)
    assert requests["C"] == [(r.prompt_token_ids, r.output_len, 0.6) for r in expected_c]
    assert {n for _, n, _ in requests["warm-up"]} >= set(range(1, 65))


def test_summary_takes_medians_and_their_ratio() -> None:
    runs = [
        {"engine": "vllm", "workload": "A", "out_tok_s": rate} for rate in (100.0, 120.0, 110.0)
    ] + [{"engine": "kvplane", "workload": "A", "out_tok_s": rate} for rate in (99.0, 121.0, 132.0)]
    runs.append({"engine": "kvplane", "workload": "A", "error": ["boom"]})
    summary = summarize(runs, ["A"])["A"]
    assert summary["vllm"]["median"] == 110.0
    assert summary["kvplane"]["median"] == 121.0
    assert summary["kvplane_over_vllm"] == 121.0 / 110.0
