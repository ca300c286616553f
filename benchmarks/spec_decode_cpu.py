"""Speculative decoding on CPU: SmolLM2-135M-Instruct with the n-gram proposer against no
speculation, on summarization-like prompts whose answers repeat the passage they quote.

Both engines live in this process (the embedded model, float32, greedy, natural EOS, so
both make the same tokens) and run alternately, ``--rounds`` times each; a round
generates for every prompt, ``--batch-size`` prompts at a time. Prints the median round
time of each, the speedup, the acceptance rate and mean accepted length, and writes JSON
(``--output-json``).

    python benchmarks/spec_decode_cpu.py --rounds 5 --batch-size 1 \
        --speculative-config '{"method": "ngram", "num_speculative_tokens": 4, \
        "prompt_lookup_min": 2, "prompt_lookup_max": 4}'
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch

PASSAGES = [
    "The old lighthouse stood on the northern cliff for two hundred years. Every night its "
    "keeper climbed the spiral stairs, trimmed the wick and watched the ships pass safely "
    "through the narrow channel below.",
    "Honeybees communicate the location of flowers through a waggle dance. The angle of the "
    "dance tells other bees the direction relative to the sun, and its length tells them "
    "how far they must fly.",
    "The city council voted on Tuesday to build a new library downtown. Construction will "
    "begin next spring, and the building is expected to open in three years with a "
    "children's wing and a rooftop garden.",
    "Water boils at a lower temperature at high altitude because the air pressure is lower. "
    "This is why cooking pasta in the mountains takes longer than cooking it at sea level.",
    "The committee reviewed forty applications and selected six finalists. Each finalist "
    "will present a short talk in March, and the winner will receive a grant to continue "
    "their research for two years.",
    "Our team released version two of the app last week. It adds offline mode, a dark "
    "theme and faster search, and it fixes the crash that some users saw when uploading "
    "large photos.",
    "Tomatoes grow best in warm soil with plenty of sunlight. Water them deeply twice a "
    "week, tie the stems to a stake as they grow, and pick the fruit when it turns deep red.",
    "The museum's new exhibit shows maps drawn by sailors in the sixteenth century. Many "
    "coastlines are surprisingly accurate, while the interiors of the continents are "
    "filled with guesses and sea monsters.",
]

INSTRUCTIONS = [
    "Quote the passage below in full, word for word, then summarize it in one sentence.",
    "Copy the passage below exactly, then add a one-sentence summary of it.",
]


def make_prompts(tokenizer: Any) -> list[list[int]]:
    """Chat prompts (the model's template) asking for a summary that quotes the passage."""
    prompts = []
    for index, passage in enumerate(PASSAGES):
        instruction = INSTRUCTIONS[index % len(INSTRUCTIONS)]
        messages = [{"role": "user", "content": f"{instruction}\n\nPassage: {passage}"}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompts.append(tokenizer.encode(text, add_special_tokens=False))
    return prompts


def run_round(
    llm: Any, prompts: list[list[int]], params: Any, batch_size: int
) -> tuple[float, int]:
    """Seconds to generate for every prompt, ``batch_size`` at a time, and output tokens."""
    started = time.perf_counter()
    num_output = 0
    for first in range(0, len(prompts), batch_size):
        batch = [{"prompt_token_ids": p} for p in prompts[first : first + batch_size]]
        outputs = llm.generate(batch, params)
        num_output += sum(len(o.outputs[0].token_ids) for o in outputs)
    return time.perf_counter() - started, num_output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument(
        "--speculative-config",
        default='{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, '
        '"prompt_lookup_max": 4}',
    )
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()

    from kvplane import LLM, SamplingParams

    spec_config = json.loads(args.speculative_config)
    common: dict[str, Any] = dict(
        device="cpu", dtype="float32", kv_cache_memory_bytes=256 * 2**20, max_model_len=1024
    )
    engines = {
        "baseline": LLM(**common),
        "speculative": LLM(**common, speculative_config=spec_config),
    }
    prompts = make_prompts(engines["baseline"].get_tokenizer())
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    outputs = {}
    batch = [{"prompt_token_ids": p} for p in prompts]
    for name, llm in engines.items():  # warm-up, and the outputs both must agree on
        outputs[name] = [o.outputs[0].token_ids for o in llm.generate(batch, params)]
    identical = outputs["baseline"] == outputs["speculative"]
    tokenizer = engines["baseline"].get_tokenizer()
    sample_output = tokenizer.decode(outputs["baseline"][0])
    decoder = engines["speculative"].engine.spec_decoder
    assert decoder is not None
    decoder.metrics.reset()
    seconds: dict[str, list[float]] = {name: [] for name in engines}
    num_output = 0
    for _ in range(args.rounds):  # alternated: both see the same load on the machine
        for name, llm in engines.items():
            elapsed, num_output = run_round(llm, prompts, params, args.batch_size)
            seconds[name].append(elapsed)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    stats = decoder.stats()
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "torch_threads": torch.get_num_threads(),
        "num_prompts": len(prompts),
        "batch_size": args.batch_size,
        "max_tokens": args.max_tokens,
        "output_tokens_per_round": num_output,
        "speculative_config": spec_config,
        "outputs_identical": identical,
        "sample_output": sample_output,
        "seconds": seconds,
        "median_seconds": medians,
        "baseline_output_tokens_per_second": num_output / medians["baseline"],
        "speculative_output_tokens_per_second": num_output / medians["speculative"],
        "speedup": medians["baseline"] / medians["speculative"],
        **stats.as_dict(),
    }
    print(json.dumps(result, indent=2))
    if args.output_json:
        with open(args.output_json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
