"""32 concurrent prompts on CPU: kvplane's engine against transformers ``generate``.

Both run in this process, on the same weights (the embedded SmolLM2-135M-Instruct GGUF,
dequantized to float32), greedy, EOS ignored so every request makes exactly
``--output-len`` tokens. Prints a table and writes JSON (``--output-json``).

    python benchmarks/cpu_engine_vs_transformers.py --num-prompts 32 --output-len 64
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch


def make_prompts(tokenizer: object, num_prompts: int, seed: int) -> list[list[int]]:
    """Varied natural-language prompts of different lengths, as token ids."""
    topics = [
        "the ocean",
        "a city at night",
        "prime numbers",
        "a bakery",
        "volcanoes",
        "the history of printing",
        "a chess game",
        "rain forests",
    ]
    rng = random.Random(seed)
    prompts = []
    for index in range(num_prompts):
        topic = topics[index % len(topics)]
        words = rng.randint(1, 6)
        text = f"Write a short story about {topic}." + " Please be vivid." * words
        prompts.append(tokenizer.encode(text))  # type: ignore[attr-defined]
    return prompts


def run_kvplane(prompts: list[list[int]], output_len: int) -> dict[str, float]:
    from kvplane import LLM, SamplingParams

    llm = LLM(dtype="float32", device="cpu", max_num_seqs=len(prompts))
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    llm.generate([{"prompt_token_ids": prompts[0]}], params)  # warm-up
    started = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    elapsed = time.perf_counter() - started
    num_output = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {
        "elapsed_time": elapsed,
        "output_tokens": num_output,
        "output_tokens_per_second": num_output / elapsed,
    }


def run_transformers(prompts: list[list[int]], output_len: int) -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    from kvplane.models.source import default_model_path

    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    pad_id = model.generation_config.pad_token_id or 0
    max_len = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad_id] * (max_len - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (max_len - len(p)) + [1] * len(p) for p in prompts])
    kwargs = dict(
        max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False, pad_token_id=pad_id
    )
    with torch.inference_mode():
        model.generate(input_ids[:1], attention_mask=attention_mask[:1], **kwargs)  # warm-up
        started = time.perf_counter()
        generated = model.generate(input_ids, attention_mask=attention_mask, **kwargs)
        elapsed = time.perf_counter() - started
    num_output = (generated.shape[1] - max_len) * len(prompts)
    return {
        "elapsed_time": elapsed,
        "output_tokens": num_output,
        "output_tokens_per_second": num_output / elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()

    from kvplane.models.config import load_tokenizer
    from kvplane.models.source import resolve_model

    tokenizer = load_tokenizer(resolve_model(None))
    prompts = make_prompts(tokenizer, args.num_prompts, args.seed)
    kvplane_result = run_kvplane(prompts, args.output_len)
    transformers_result = run_transformers(prompts, args.output_len)
    ratio = (
        kvplane_result["output_tokens_per_second"] / transformers_result["output_tokens_per_second"]
    )
    result = {
        "num_prompts": args.num_prompts,
        "output_len": args.output_len,
        "torch_threads": torch.get_num_threads(),
        "kvplane": kvplane_result,
        "transformers": transformers_result,
        "ratio": ratio,
    }
    print(f"{'engine':<14}{'elapsed s':>12}{'output tok':>12}{'out tok/s':>12}")
    for name in ("kvplane", "transformers"):
        row = result[name]
        print(
            f"{name:<14}{row['elapsed_time']:>12.2f}{row['output_tokens']:>12.0f}"
            f"{row['output_tokens_per_second']:>12.1f}"
        )
    print(f"ratio kvplane / transformers: {ratio:.2f}x")
    if args.output_json:
        with open(args.output_json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
