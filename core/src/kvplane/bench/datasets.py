"""Benchmark workloads: random token ids, the "nano" workload, and ShareGPT files."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DATASETS = ("random", "nano", "sharegpt")


@dataclass(frozen=True, slots=True)
class BenchRequest:
    """One benchmark request: prompt token ids and the exact number of tokens to make."""

    prompt_token_ids: list[int]
    output_len: int


def random_requests(
    num_prompts: int, input_len: int, output_len: int, vocab_size: int, seed: int
) -> list[BenchRequest]:
    """Fixed lengths, token ids uniform over the vocabulary (vLLM's random dataset)."""
    rng = random.Random(seed)
    return [
        BenchRequest([rng.randrange(vocab_size) for _ in range(input_len)], output_len)
        for _ in range(num_prompts)
    ]


def nano_requests(num_prompts: int = 256, seed: int = 0) -> list[BenchRequest]:
    """Workload C: lengths uniform in [100, 1024], token ids in [0, 10000], drawn in this
    order from Python's ``random.seed(0)`` (prompts first, then output lengths), which
    gives 142,827 prompt and 133,966 output tokens for 256 prompts."""
    rng = random.Random(seed)
    prompts = [
        [rng.randint(0, 10000) for _ in range(rng.randint(100, 1024))] for _ in range(num_prompts)
    ]
    output_lens = [rng.randint(100, 1024) for _ in range(num_prompts)]
    return [BenchRequest(p, n) for p, n in zip(prompts, output_lens, strict=True)]


def sharegpt_requests(
    path: Path, num_prompts: int, tokenizer: Any, seed: int, output_len: int | None = None
) -> list[BenchRequest]:
    """The first human turn of each conversation as the prompt and the length of the
    reply as the output length (vLLM's ShareGPT sampling: too short or too long pairs are
    skipped)."""
    if tokenizer is None:
        raise ValueError("the sharegpt dataset needs a tokenizer")
    conversations = json.loads(Path(path).read_text())
    random.Random(seed).shuffle(conversations)
    requests: list[BenchRequest] = []
    for conversation in conversations:
        turns = conversation.get("conversations") or conversation.get("conversation") or []
        if len(turns) < 2:
            continue
        prompt_ids = tokenizer.encode(turns[0]["value"])
        reply_len = output_len or len(tokenizer.encode(turns[1]["value"]))
        if len(prompt_ids) < 4 or reply_len < 4 or len(prompt_ids) > 1024:
            continue
        if len(prompt_ids) + reply_len > 2048:
            continue
        requests.append(BenchRequest(prompt_ids, reply_len))
        if len(requests) == num_prompts:
            break
    if not requests:
        raise ValueError(f"{path} holds no usable ShareGPT conversations")
    return requests


def make_requests(args: Any, vocab_size: int, tokenizer: Any) -> list[BenchRequest]:
    """The workload named by the ``--dataset`` flags of ``kvplane bench``."""
    if args.dataset == "nano":
        return nano_requests(args.num_prompts or 256, args.seed)
    if args.dataset == "sharegpt":
        if not args.dataset_path:
            raise ValueError("--dataset sharegpt needs --dataset-path FILE")
        return sharegpt_requests(
            Path(args.dataset_path), args.num_prompts or 1000, tokenizer, args.seed, args.output_len
        )
    return random_requests(
        args.num_prompts or 1000, args.input_len, args.output_len, vocab_size, args.seed
    )
