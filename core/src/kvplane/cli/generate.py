"""``kvplane generate``: run prompts through the offline engine and print completions."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from kvplane.cli.engine_args import add_engine_arguments, engine_config_from_args


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "generate",
        help="generate completions for prompts (offline, no server)",
        description="Generate completions for one or more prompts with the offline engine.",
    )
    parser.add_argument("prompts", nargs="*", help="prompts (default: read lines from stdin)")
    parser.add_argument(
        "--chat",
        action="store_true",
        help="treat each prompt as a user message and apply the chat template",
    )
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--sampling-seed", type=int, default=None, help="per-request seed")
    add_engine_arguments(parser, skip=("engine_process", "log_stats_interval"))
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from kvplane.engine.llm import LLM
    from kvplane.sampling.params import SamplingParams

    prompts = args.prompts or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not prompts:
        print("kvplane generate: no prompts given", file=sys.stderr)
        return 2
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.sampling_seed,
    )
    llm = LLM.from_config(engine_config_from_args(args))
    if args.chat:
        conversations = [[{"role": "user", "content": prompt}] for prompt in prompts]
        outputs = llm.chat(conversations, params)
    else:
        outputs = llm.generate(prompts, params)
    for prompt, output in zip(prompts, outputs, strict=True):
        completion = output.outputs[0]
        print(
            f"### {prompt}\n{completion.text}\n[{completion.finish_reason}, "
            f"{len(completion.token_ids)} tokens]\n"
        )
    return 0
