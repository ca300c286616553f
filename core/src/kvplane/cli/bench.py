"""``kvplane bench {throughput,latency,serve}``: reproducible performance figures."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from kvplane.cli.engine_args import add_engine_arguments, engine_config_from_args


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "bench",
        help="benchmark throughput, latency or a serving endpoint",
        description="Benchmarks with vLLM-compatible workloads and JSON field names.",
    )
    commands = parser.add_subparsers(dest="bench_command", metavar="KIND", required=True)

    throughput = commands.add_parser("throughput", help="offline throughput of the engine")
    _add_workload_arguments(throughput, default_prompts=1000)
    throughput.add_argument(
        "--dummy",
        metavar="NAME",
        default=None,
        help="random weights of a built-in config (e.g. qwen3-0.6b), no "
        "files needed; for a local config use --load-format dummy",
    )
    throughput.add_argument("--temperature", type=float, default=1.0)
    throughput.add_argument(
        "--baseline",
        choices=("transformers",),
        default=None,
        help="run the same workload through transformers generate too",
    )
    throughput.add_argument("--baseline-batch-size", type=int, default=64)
    throughput.add_argument("--output-json", default=None)
    add_engine_arguments(throughput, skip=("seed", "engine_process", "log_stats_interval"))
    throughput.set_defaults(handler=run_throughput)

    latency = commands.add_parser("latency", help="latency of one batch, repeated")
    latency.add_argument("--batch-size", type=positive_int, default=8, help="sequences per batch")
    latency.add_argument("--input-len", type=positive_int, default=32, help="prompt tokens")
    latency.add_argument("--output-len", type=positive_int, default=128, help="tokens generated")
    latency.add_argument("--num-iters-warmup", type=int, default=2, help="untimed runs first")
    latency.add_argument("--num-iters", type=positive_int, default=5, help="timed runs")
    latency.add_argument(
        "--dummy",
        metavar="NAME",
        default=None,
        help="random weights of a built-in config (e.g. qwen3-0.6b)",
    )
    latency.add_argument("--output-json", default=None)
    add_engine_arguments(latency, skip=("seed", "engine_process", "log_stats_interval"))
    latency.add_argument("--seed", type=int, default=0)
    latency.set_defaults(handler=run_latency)

    serve = commands.add_parser("serve", help="streaming load against an OpenAI-compatible server")
    serve.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000")
    serve.add_argument(
        "--model",
        required=True,
        help="model name the server knows; a local path or built-in config "
        "name also gives the vocabulary for random prompts",
    )
    serve.add_argument(
        "--served-model-name", default=None, help="name to send in requests, if not --model"
    )
    serve.add_argument("--vocab-size", type=int, default=None)
    _add_workload_arguments(serve, default_prompts=1000)
    serve.add_argument(
        "--request-rate",
        type=float,
        default=float("inf"),
        help="requests per second (Poisson arrivals); inf sends all at once",
    )
    serve.add_argument("--max-concurrency", type=int, default=None)
    serve.add_argument("--api-key", default=None)
    serve.add_argument("--output-json", default=None)
    serve.add_argument("--plot", default=None, metavar="FILE.png")
    serve.set_defaults(handler=run_serve)
    return parser


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _add_workload_arguments(parser: argparse.ArgumentParser, default_prompts: int) -> None:
    parser.add_argument(
        "--dataset",
        nargs="+",
        default=["random"],
        metavar="NAME [FILE]",
        help="random | nano | sharegpt FILE (a ShareGPT JSON file)",
    )
    parser.add_argument(
        "--dataset-path",
        default=None,
        help="ShareGPT JSON file (or give it after --dataset sharegpt)",
    )
    parser.add_argument(
        "--input-len", type=positive_int, default=1024, help="prompt tokens (random dataset)"
    )
    parser.add_argument(
        "--output-len", type=positive_int, default=128, help="tokens to generate per request"
    )
    parser.add_argument(
        "--num-prompts",
        type=positive_int,
        default=None,
        help=f"requests to run (default: {default_prompts}; 256 for nano)",
    )
    parser.add_argument("--seed", type=int, default=0)


def _normalize_dataset(args: argparse.Namespace) -> None:
    """Accept ``--dataset sharegpt FILE`` as well as ``--dataset-path FILE``."""
    name, *rest = args.dataset
    if name not in ("random", "nano", "sharegpt") or len(rest) > 1:
        raise SystemExit(
            f"kvplane bench: --dataset must be random, nano or sharegpt FILE, "
            f"got {' '.join(args.dataset)!r}"
        )
    if rest and name != "sharegpt":
        raise SystemExit(f"kvplane bench: --dataset {name} takes no file")
    args.dataset = name
    if rest:
        args.dataset_path = rest[0]


def _engine_config(args: argparse.Namespace) -> Any:
    if args.dummy:
        return engine_config_from_args(args, model=args.dummy, load_format="dummy")
    return engine_config_from_args(args)


def run_throughput(args: argparse.Namespace) -> int:
    from kvplane.bench.datasets import make_requests
    from kvplane.bench.results import print_table, write_json
    from kvplane.bench.throughput import run_kvplane, run_transformers
    from kvplane.engine.llm import LLM

    _normalize_dataset(args)
    llm = LLM.from_config(_engine_config(args))
    hf_config = llm.engine.model_config.hf_config
    requests = make_requests(args, hf_config.vocab_size, llm.get_tokenizer())
    temperature = 0.6 if args.dataset == "nano" and args.temperature == 1.0 else args.temperature
    result: dict[str, Any] = run_kvplane(llm, requests, temperature)
    print_table("kvplane throughput", result)
    if args.baseline == "transformers":
        model = _transformers_model(llm)
        del llm
        baseline = run_transformers(model, requests, args.baseline_batch_size, temperature)
        print_table("transformers throughput", baseline)
        ratio = result["output_tokens_per_second"] / baseline["output_tokens_per_second"]
        print(f"kvplane / transformers output tokens/s: {ratio:.2f}x")
        result = {
            **result,
            "baseline": {"engine": "transformers", **baseline},
            "ratio_vs_baseline": ratio,
        }
    write_json(args.output_json, result)
    return 0


def _transformers_model(llm: Any) -> Any:
    """The same model in transformers: same weights for real checkpoints, same shapes
    (random weights) for dummy ones."""
    from transformers import AutoModelForCausalLM

    engine = llm.engine
    source = engine.model_config.source
    dtype = engine.model_config.dtype
    if engine.config.load_format == "dummy":
        model = AutoModelForCausalLM.from_config(engine.model_config.hf_config, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            str(source.directory), dtype=dtype, **source.hf_kwargs()
        )
    return model.to(engine.device).eval()


def run_latency(args: argparse.Namespace) -> int:
    from kvplane.bench.latency import run_latency as measure
    from kvplane.bench.results import print_table, write_json
    from kvplane.engine.llm import LLM

    llm = LLM.from_config(_engine_config(args))
    vocab_size = llm.engine.model_config.hf_config.vocab_size
    result = measure(
        llm,
        args.batch_size,
        args.input_len,
        args.output_len,
        args.num_iters_warmup,
        args.num_iters,
        vocab_size,
        args.seed,
    )
    print_table("kvplane latency", {k: v for k, v in result.items() if isinstance(v, int | float)})
    write_json(args.output_json, result)
    return 0


def _event_loop_runner() -> Any:
    """``uvloop.run`` where uvloop is installed (the client reads every stream's events
    on one thread: the C event loop costs less per read), else ``asyncio.run``."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run
    return uvloop.run


def run_serve(args: argparse.Namespace) -> int:
    from kvplane.bench.datasets import make_requests
    from kvplane.bench.results import print_table, write_json
    from kvplane.bench.serve import plot_serve
    from kvplane.bench.serve import run_serve as measure

    _normalize_dataset(args)
    vocab_size, tokenizer = _vocabulary(args)
    requests = make_requests(args, vocab_size, tokenizer)
    metrics, results = _event_loop_runner()(
        measure(
            args.base_url,
            args.served_model_name or args.model,
            requests,
            args.request_rate,
            args.max_concurrency,
            args.seed,
            args.api_key,
        )
    )
    print_table("serving benchmark", {k: v for k, v in metrics.items() if k != "errors"})
    for error in metrics.get("errors", []):
        print(f"error: {error}")
    write_json(args.output_json, metrics)
    if args.plot:
        plot_serve(results, metrics, args.plot)
    return 0 if metrics["completed"] else 1


def _vocabulary(args: argparse.Namespace) -> tuple[int, Any]:
    """Vocabulary size (and tokenizer, if any) of ``--model`` for random prompts."""
    from kvplane.models.config import load_hf_config, load_tokenizer
    from kvplane.models.source import resolve_model

    try:
        source = resolve_model(args.model, "dummy")
    except ValueError:
        if args.vocab_size is None:
            raise ValueError(
                f"{args.model!r} is not a local model or built-in config: pass "
                "--vocab-size for random prompts"
            ) from None
        return args.vocab_size, None
    hf_config = load_hf_config(source)
    # Random prompts need only the vocabulary size; ShareGPT text needs the tokenizer.
    needs_tokenizer = args.dataset == "sharegpt" and source.has_files
    tokenizer = load_tokenizer(source) if needs_tokenizer else None
    return args.vocab_size or hf_config.vocab_size, tokenizer
