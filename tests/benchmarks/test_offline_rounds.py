"""The offline comparison's prompts and summary (the engines themselves run on the GPU)."""

from __future__ import annotations

import random

from benchmarks.gpu.offline_rounds import summarize, workload_requests


def test_workload_c_draws_what_the_vllm_nano_script_draws() -> None:
    """Same seed, same draw order: the prompts of both prompt lists, then the lengths."""
    random.seed(0)
    prompts = [
        [random.randint(0, 10000) for _ in range(random.randint(100, 1024))] for _ in range(256)
    ]
    max_tokens = [random.randint(100, 1024) for _ in range(256)]
    requests = workload_requests("C")
    assert [ids for ids, _, _ in requests] == prompts
    assert [n for _, n, _ in requests] == max_tokens
    assert {t for _, _, t in requests} == {0.6}


def test_workload_a_is_500_prompts_of_1024_tokens() -> None:
    requests = workload_requests("A")
    assert len(requests) == 500
    assert {len(ids) for ids, _, _ in requests} == {1024}
    assert {(n, t) for _, n, t in requests} == {(128, 1.0)}
    assert workload_requests("A") == requests  # the same for every worker


def test_summary_takes_medians_and_their_ratio() -> None:
    runs = [
        {"engine": "vllm", "workload": "A", "out_tok_s": rate} for rate in (100.0, 120.0, 110.0)
    ] + [{"engine": "kvplane", "workload": "A", "out_tok_s": rate} for rate in (99.0, 121.0, 132.0)]
    runs.append({"engine": "kvplane", "workload": "A", "error": ["boom"]})
    summary = summarize(runs, ["A"])["A"]
    assert summary["vllm"]["median"] == 110.0
    assert summary["kvplane"]["median"] == 121.0
    assert summary["kvplane_over_vllm"] == 121.0 / 110.0
