"""Latency of one batch: fixed batch size, input and output lengths, repeated."""

from __future__ import annotations

import statistics
import time
from typing import Any

from kvplane.bench.datasets import random_requests
from kvplane.bench.results import percentile

PERCENTILES = (10, 25, 50, 75, 90, 99)


def run_latency(
    llm: Any,
    batch_size: int,
    input_len: int,
    output_len: int,
    num_warmup: int,
    num_iters: int,
    vocab_size: int,
    seed: int,
) -> dict[str, Any]:
    """Time ``num_iters`` generates of one batch (after ``num_warmup`` untimed ones)."""
    from tqdm import tqdm

    from kvplane.sampling.params import SamplingParams

    requests = random_requests(batch_size, input_len, output_len, vocab_size, seed)
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
    params = SamplingParams(
        temperature=1.0, top_p=1.0, ignore_eos=True, max_tokens=output_len, detokenize=False
    )
    for _ in tqdm(range(num_warmup), desc="warm-up"):
        llm.generate(prompts, params)
    latencies = []
    for _ in tqdm(range(num_iters), desc="timed"):
        started = time.perf_counter()
        llm.generate(prompts, params)
        latencies.append(time.perf_counter() - started)
    average = statistics.fmean(latencies)
    return {
        "batch_size": batch_size,
        "input_len": input_len,
        "output_len": output_len,
        "avg_latency": average,
        "avg_per_token_ms": 1000 * average / output_len,
        "latencies": latencies,
        "percentiles": {str(q): percentile(latencies, q) for q in PERCENTILES},
    }
