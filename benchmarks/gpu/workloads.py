"""Workload C (nano), workload A (random 1024 -> 128) and batch latency, through kvplane's
offline ``LLM`` with random weights of the built-in configs, on the CUDA platform.

Every timed call follows one warm-up ``generate`` of short prompts whose output lengths
run from 1 to ``max_num_seqs`` tokens, so the batch passes through every size (each
CUDA-graph bucket is captured before the timer starts); its 4-token prompts fill no
block, so they leave nothing in the prefix cache.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from benchmarks.gpu.common import Suite
from benchmarks.gpu.env import memory_rates
from benchmarks.gpu.roofline import model_cost, simulate

#: The workload C model (the nano-vllm benchmark's).
C_MODEL = "qwen3-0.6b"
LATENCY_BATCH_SIZES = (1, 32)
LATENCY_INPUT_LEN, LATENCY_OUTPUT_LEN = 128, 256


def warm_up(llm: Any, num_seqs: int, vocab_size: int, long_prompt_len: int) -> float:
    """One ``generate``: ``num_seqs`` 4-token prompts making 1..num_seqs tokens (every
    decode batch size, hence every graph bucket) plus two long prompts (the prefill
    kernels' long-query variants compile here, not in a timed run)."""
    from kvplane import SamplingParams

    rng = random.Random(1234)
    short = [rng.randrange(vocab_size) for _ in range(4)]
    prompts = [{"prompt_token_ids": short} for _ in range(num_seqs)]
    params = [
        SamplingParams(temperature=1.0, ignore_eos=True, max_tokens=n + 1, detokenize=False)
        for n in range(num_seqs)
    ]
    for _ in range(2):
        prompts.append(
            {"prompt_token_ids": [rng.randrange(vocab_size) for _ in range(long_prompt_len)]}
        )
        params.append(SamplingParams(ignore_eos=True, max_tokens=2, detokenize=False))
    started = time.perf_counter()
    llm.generate(prompts, params)
    return time.perf_counter() - started


def _prepare(suite: Suite, model: str) -> tuple[Any, dict[str, Any], float]:
    """The model's engine, warmed up once (the first section using it pays for it)."""
    assert suite.engines is not None
    llm, info = suite.engines.get(model)
    if "warmup_seconds" not in info:
        vocab = llm.engine.model_config.hf_config.vocab_size
        num_seqs = min(info["max_num_seqs"], 512 if suite.is_cuda else 8)
        info["warmup_seconds"] = warm_up(llm, num_seqs, vocab, 1024 if suite.is_cuda else 64)
    return llm, info, info["warmup_seconds"]


def _shrink(requests: list[Any], factor: int, vocab_size: int) -> list[Any]:
    """Lengths divided by ``factor``, ids folded into a tiny vocabulary (CPU smoke only)."""
    from kvplane.bench.datasets import BenchRequest

    return [
        BenchRequest(
            [
                t % vocab_size
                for t in r.prompt_token_ids[: max(1, len(r.prompt_token_ids) // factor)]
            ],
            max(1, r.output_len // factor),
        )
        for r in requests
    ]


@contextmanager
def step_phases(llm: Any, into: dict[str, Any]) -> Iterator[None]:
    """Turn the engine's step timer on around a timed call; ``into["step_phases_ms"]``
    gets host milliseconds per step by phase, ``into["large_decode_steps_ms"]`` the same
    over decode steps of 256 or more sequences with their period and host share (both
    absent on engines without a timer)."""
    timer = getattr(llm.engine.runner, "timer", None)
    if timer is None:
        yield
        return
    timer.reset()
    timer.enabled = True
    try:
        yield
    finally:
        timer.enabled = False
        into["step_phases_ms"] = timer.summary()
        into["large_decode_steps_ms"] = timer.large_decode_summary()


def run_c(suite: Suite) -> dict[str, Any]:
    from kvplane.bench.datasets import nano_requests

    num_seqs = 256 if not suite.args.quick else 64
    requests = nano_requests(num_seqs if suite.is_cuda else 4, seed=0)
    llm, info, warmup_s = _prepare(suite, C_MODEL)
    if not suite.is_cuda:
        requests = _shrink(requests, 16, llm.engine.model_config.hf_config.vocab_size)
    fields = {
        "model": C_MODEL,
        "num_requests": len(requests),
        "expected_output_tokens": sum(r.output_len for r in requests),
    }
    return _run_throughput(suite, llm, info, warmup_s, requests, 0.6, fields)


def run_a(suite: Suite, model: str) -> dict[str, Any]:
    from kvplane.bench.datasets import random_requests

    llm, info, warmup_s = _prepare(suite, model)
    vocab = llm.engine.model_config.hf_config.vocab_size
    if suite.is_cuda:
        shape = (100 if suite.args.quick else 500, 1024, 128)
    else:
        shape = (8, 64, 16)
    requests = random_requests(*shape, vocab_size=vocab, seed=suite.args.seed)
    num_prompts, input_len, output_len = shape
    fields = {
        "model": model,
        "num_prompts": num_prompts,
        "input_len": input_len,
        "output_len": output_len,
    }
    return _run_throughput(suite, llm, info, warmup_s, requests, 1.0, fields)


def _run_throughput(
    suite: Suite,
    llm: Any,
    info: dict[str, Any],
    warmup_seconds: float,
    requests: list[Any],
    temperature: float,
    fields: dict[str, Any],
) -> dict[str, Any]:
    """One timed offline run of ``requests``: ``fields`` plus its step phases, result,
    engine and roofline ceiling."""
    from kvplane.bench.throughput import run_kvplane

    phases: dict[str, Any] = {}
    with step_phases(llm, phases):
        result = run_kvplane(llm, requests, temperature=temperature, warmup=False)
    out = {
        **phases,
        **fields,
        "warmup_seconds": warmup_seconds,
        "kvplane": result,
        "engine": info,
    }
    out.update(ceiling(suite, llm, info, requests, result["output_tokens_per_second"]))
    return out


def run_latency(suite: Suite, model: str) -> dict[str, Any]:
    """vLLM's ``bench latency`` protocol (temperature 1, top_p 1, EOS ignored); the prefix
    cache is emptied before each call so repeats of the same batch do no less work."""
    from kvplane import SamplingParams
    from kvplane.bench.datasets import random_requests
    from kvplane.bench.results import percentile

    llm, info, warmup_s = _prepare(suite, model)
    vocab = llm.engine.model_config.hf_config.vocab_size
    if suite.is_cuda:
        batch_sizes, input_len, output_len = (
            LATENCY_BATCH_SIZES,
            LATENCY_INPUT_LEN,
            LATENCY_OUTPUT_LEN,
        )
    else:
        batch_sizes, input_len, output_len = (1, 4), 16, 16
    num_iters = 2 if suite.args.quick else 4
    block_manager = llm.engine.scheduler.block_manager
    out: dict[str, Any] = {"model": model, "warmup_seconds": warmup_s, "engine": info}
    for batch_size in batch_sizes:
        requests = random_requests(batch_size, input_len, output_len, vocab, suite.args.seed)
        prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
        params = SamplingParams(
            temperature=1.0, top_p=1.0, ignore_eos=True, max_tokens=output_len, detokenize=False
        )
        latencies = []
        block_manager.reset_prefix_cache()
        llm.generate(prompts, params)  # warm-up
        phases: dict[str, Any] = {}
        with step_phases(llm, phases):
            for _ in range(num_iters):
                block_manager.reset_prefix_cache()
                started = time.perf_counter()
                llm.generate(prompts, params)
                latencies.append(time.perf_counter() - started)
        average = statistics.fmean(latencies)
        out[f"bs{batch_size}"] = {
            **phases,
            "batch_size": batch_size,
            "input_len": input_len,
            "output_len": output_len,
            "avg_latency": average,
            "avg_per_token_ms": 1000 * average / output_len,
            "output_tokens_per_second": batch_size * output_len / average,
            "latencies": latencies,
            "percentiles": {str(q): percentile(latencies, q) for q in (10, 50, 90, 99)},
        }
        print(f"[latency] {model} bs{batch_size}: {average:.3f} s", flush=True)
    return out


def ceiling(
    suite: Suite, llm: Any, info: dict[str, Any], requests: list[Any], measured: float
) -> dict[str, Any]:
    """The roofline ceiling of this run's workload and the fraction of it reached."""
    import torch

    rates = memory_rates(suite)
    engine = llm.engine
    dtype_bytes = torch.empty((), dtype=engine.model_config.dtype).element_size()
    roofline = simulate(
        [(len(r.prompt_token_ids), r.output_len) for r in requests],
        model_cost(engine.model_config.hf_config, dtype_bytes),
        bandwidth=rates["copy_read_write_GBps"] * 1e9,
        flops=rates["matmul_TFLOPs"] * 1e12,
        max_num_seqs=info["max_num_seqs"],
        max_num_batched_tokens=info["max_num_batched_tokens"],
        capacity_tokens=info["kv_cache_tokens"],
    )
    limit = roofline["ceiling_output_tokens_per_s"]
    return {"roofline": roofline, "fraction_of_ceiling": measured / limit if limit else None}
