"""Offline throughput: every request through ``LLM.generate`` at once, timed."""

from __future__ import annotations

import time
from typing import Any

from kvplane.bench.datasets import BenchRequest


def throughput_params(requests: list[BenchRequest], temperature: float) -> list[Any]:
    """vLLM's protocol: top_p 1, EOS ignored, exactly ``output_len`` tokens each."""
    from kvplane.sampling.params import SamplingParams

    return [
        SamplingParams(
            temperature=temperature,
            top_p=1.0,
            ignore_eos=True,
            max_tokens=request.output_len,
            detokenize=False,
        )
        for request in requests
    ]


def run_kvplane(
    llm: Any, requests: list[BenchRequest], temperature: float, warmup: bool = True
) -> dict[str, float]:
    """Time one ``generate`` over all requests (model load and warm-up excluded).

    The result also holds the engine's host milliseconds per step by phase
    (``step_ms_<phase>``, see :mod:`kvplane.engine.step_timer`) and ``num_steps``, and
    the same over the decode steps of at least 256 sequences (``decode256_*``: ``steps``,
    ``ms_<phase>``, ``ms_step`` the period, ``ms_host`` schedule + prepare + update,
    ``host_share`` host / period). With speculative decoding, ``spec_decode_*``: the
    method, drafts, draft and accepted tokens, ``spec_decode_acceptance_rate`` and
    ``spec_decode_mean_accepted_length`` of the timed run.
    """
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
    params = throughput_params(requests, temperature)
    if warmup:
        llm.generate(prompts[:1], throughput_params(requests[:1], temperature)[0].clone())
    spec_decoder = llm.engine.spec_decoder
    if spec_decoder is not None:
        spec_decoder.metrics.reset()  # count the timed run only
    timer = llm.engine.runner.timer
    timer.reset()
    timer.enabled = True
    try:
        started = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=True)
        elapsed = time.perf_counter() - started
    finally:
        timer.enabled = False
    num_output = sum(len(o.outputs[0].token_ids) for o in outputs)
    result = throughput_result(requests, elapsed, num_output)
    if spec_decoder is not None:
        result.update(spec_decoder.stats().as_dict())
    phases = timer.summary()
    result["num_steps"] = phases.pop("steps")
    result.update({f"step_ms_{name}": value for name, value in phases.items()})
    large = timer.large_decode_summary()
    label = f"decode{timer.large_batch}"
    for name, value in large.items():
        key = name if name in ("steps", "host_share") else f"ms_{name}"
        result[f"{label}_{key}"] = value
    return result


def throughput_result(
    requests: list[BenchRequest], elapsed: float, num_output: int
) -> dict[str, float]:
    num_prompt = sum(len(r.prompt_token_ids) for r in requests)
    return {
        "elapsed_time": elapsed,
        "num_requests": len(requests),
        "total_num_tokens": num_prompt + num_output,
        "total_output_tokens": num_output,
        "requests_per_second": len(requests) / elapsed,
        "tokens_per_second": (num_prompt + num_output) / elapsed,
        "output_tokens_per_second": num_output / elapsed,
    }


def run_transformers(
    model: Any, requests: list[BenchRequest], batch_size: int, temperature: float
) -> dict[str, float]:
    """The same workload through transformers ``generate`` in static batches (left
    padding; each batch runs to its longest ``output_len``, every request counts only its
    own tokens)."""
    import torch
    from tqdm import tqdm

    device = next(model.parameters()).device
    pad_id = 0
    started = time.perf_counter()
    num_output = 0
    batches = [requests[i : i + batch_size] for i in range(0, len(requests), batch_size)]
    for batch in tqdm(batches, desc="transformers", unit="batch"):
        max_len = max(len(r.prompt_token_ids) for r in batch)
        ids = torch.tensor(
            [[pad_id] * (max_len - len(r.prompt_token_ids)) + r.prompt_token_ids for r in batch],
            device=device,
        )
        mask = torch.tensor(
            [
                [0] * (max_len - len(r.prompt_token_ids)) + [1] * len(r.prompt_token_ids)
                for r in batch
            ],
            device=device,
        )
        new_tokens = max(r.output_len for r in batch)
        with torch.inference_mode():
            generated = model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=temperature > 0,
                temperature=temperature if temperature > 0 else None,
                top_p=1.0,
                pad_token_id=pad_id,
            )
        num_output += sum(r.output_len for r in batch)
        generated.cpu()  # wait for the device to finish this batch
    return throughput_result(requests, time.perf_counter() - started, num_output)
