"""The physical limit of a workload on this machine (performance.md, "The physical limit").

Per decode step at batch B: ``t_step >= max((W + sum_i ctx_i * kv_bytes_per_token) / BW,
(B * 2 * N + sum_i ctx_i * a) / F)`` with W the weight bytes read per step, BW the
measured copy bandwidth (read+write bytes / time), N the parameters multiplied per token,
F the measured bf16 matmul rate and ``a`` the attention FLOPs per (query, cached key).

The schedule is simulated, not measured. Approximations (all of them make the ceiling
optimistic, i.e. a true upper bound of what an engine can reach, except the first):
- admission is first come, first served up to ``max_num_seqs`` sequences and the KV
  capacity, reserving each sequence's whole prompt + output up front (no preemption);
- a newly admitted group is prefilled in one go, its time ``max(bytes / BW, flops / F)``
  with the weights read once per ``max_num_batched_tokens`` chunk, and it is not
  overlapped with decode steps (real engines mix them); prefill gives the first token;
- every running sequence decodes one token per step; nothing else costs time (no
  sampling, no launch gaps, no activations, perfect bandwidth use).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class ModelCost:
    """Per-step constants of a dense decoder, from its config."""

    weight_bytes: float  # read once per step: every layer, final norm, LM head
    matmul_params: float  # parameters multiplied per token: layers + LM head
    kv_bytes_per_token: float  # 2 * layers * kv_heads * head_dim * dtype bytes
    attention_flops_per_key: float  # per query token and cached key, all layers


def model_cost(config: Any, dtype_bytes: int = 2) -> ModelCost:
    """Costs of a Llama/Qwen-style model (the embedding table of an untied model is not
    read per step: only B rows of it are)."""
    if getattr(config, "num_experts", None):
        raise ValueError("the roofline here models dense decoders only")
    hidden = config.hidden_size
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    layers = config.num_hidden_layers
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)  # q and o, k and v
    mlp = 3 * hidden * config.intermediate_size  # gate, up, down
    lm_head = config.vocab_size * hidden
    matmul = layers * (attention + mlp) + lm_head
    weights = matmul + layers * 2 * hidden + hidden  # plus the norms
    return ModelCost(
        weight_bytes=weights * dtype_bytes,
        matmul_params=matmul,
        kv_bytes_per_token=2 * layers * kv_heads * head_dim * dtype_bytes,
        attention_flops_per_key=4 * heads * head_dim * layers,
    )


def simulate(
    requests: Sequence[tuple[int, int]],
    cost: ModelCost,
    bandwidth: float,
    flops: float,
    max_num_seqs: int,
    max_num_batched_tokens: int,
    capacity_tokens: int | None = None,
) -> dict[str, Any]:
    """Ceiling of ``requests`` (``(prompt_len, output_len)`` pairs); ``bandwidth`` in
    bytes/s, ``flops`` in FLOP/s. Returns the ceiling and how the time splits."""
    waiting = deque(requests)
    running: list[list[int]] = []  # [keys at the next decode step, decodes left, reserved]
    reserved = 0
    prefill_s = decode_s = 0.0
    num_steps = memory_bound_steps = batch_total = 0
    bytes_total = 0.0
    while waiting or running:
        admitted: list[tuple[int, int]] = []
        while waiting and len(running) + len(admitted) < max_num_seqs:
            prompt_len, output_len = waiting[0]
            need = prompt_len + output_len
            fits = capacity_tokens is None or reserved + need <= capacity_tokens
            if not fits and (running or admitted):
                break
            waiting.popleft()
            reserved += need
            admitted.append((prompt_len, output_len))
        if admitted:
            num_tokens = sum(p for p, _ in admitted)
            work = 2 * cost.matmul_params * num_tokens + sum(
                0.5 * p * p * cost.attention_flops_per_key for p, _ in admitted
            )
            moved = (
                cost.weight_bytes * math.ceil(num_tokens / max_num_batched_tokens)
                + num_tokens * cost.kv_bytes_per_token
            )
            prefill_s += max(moved / bandwidth, work / flops)
            bytes_total += moved
            running.extend([p + 1, o - 1, p + o] for p, o in admitted)
        for entry in [entry for entry in running if entry[1] <= 0]:
            running.remove(entry)
            reserved -= entry[2]
        if not running:
            continue
        batch = len(running)
        keys = sum(entry[0] for entry in running)
        moved = cost.weight_bytes + keys * cost.kv_bytes_per_token
        work = 2 * cost.matmul_params * batch + keys * cost.attention_flops_per_key
        memory_s, compute_s = moved / bandwidth, work / flops
        decode_s += max(memory_s, compute_s)
        memory_bound_steps += memory_s >= compute_s
        bytes_total += moved
        num_steps += 1
        batch_total += batch
        for entry in running:
            entry[0] += 1
            entry[1] -= 1
        for entry in [entry for entry in running if entry[1] <= 0]:
            running.remove(entry)
            reserved -= entry[2]
    num_output = sum(o for _, o in requests)
    total_s = prefill_s + decode_s
    return {
        "ceiling_output_tokens_per_s": num_output / total_s if total_s else None,
        "ceiling_decode_only_output_tokens_per_s": num_output / decode_s if decode_s else None,
        "simulated_seconds": total_s,
        "prefill_seconds": prefill_s,
        "decode_seconds": decode_s,
        "num_decode_steps": num_steps,
        "mean_decode_batch": batch_total / num_steps if num_steps else 0.0,
        "memory_bound_steps": memory_bound_steps,
        "bytes_moved": bytes_total,
        "inputs": {
            "bandwidth_GBps": bandwidth / 1e9,
            "matmul_TFLOPs": flops / 1e12,
            "max_num_seqs": max_num_seqs,
            "max_num_batched_tokens": max_num_batched_tokens,
            "capacity_tokens": capacity_tokens,
            **asdict(cost),
        },
    }
