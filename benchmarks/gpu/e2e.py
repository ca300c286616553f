"""End-to-end correctness: kvplane's greedy tokens against transformers on the same weights.

For each case a transformers model of the real config is created on the device with a
fixed seed, saved as safetensors and loaded by kvplane. Both generate greedily;
transformers reports its raw logits per step (top-5), kvplane its ``logprobs=5``.

Verdict in bf16 (rounding differs between kernels, so greedy paths may part):
- at the first position where the tokens differ, each engine's token is in the other's
  top-5 (same context there);
- at every position, kvplane's token is in transformers' top-5 of a teacher-forced pass
  over kvplane's own output (same context after a divergence too).
In float32 the tokens must be identical. Per-position counts after the first divergence
(which compare different contexts) are reported as information.
"""

from __future__ import annotations

import random
import shutil
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks.gpu.common import Suite, engine_info, free_memory, hf_config

TOP_K = 5


def run_e2e(suite: Suite) -> dict[str, Any]:
    args = suite.args
    tiny = not suite.is_cuda
    cases: list[tuple[str, str, int | None]] = [(model, "bfloat16", None) for model in args.models]
    cases.append(("qwen3-0.6b", "float32", 2 if tiny else 4))
    if tiny or args.quick:
        num_prompts, num_tokens = (4, 8) if tiny else (8, 16)
    else:
        num_prompts, num_tokens = 16, 32
    result: dict[str, Any] = {"num_prompts": num_prompts, "num_tokens": num_tokens, "cases": {}}
    for model, dtype, num_layers in cases:
        key = f"{model}-{dtype}" + (f"-{num_layers}layers" if num_layers else "")
        print(f"[e2e] {key}: {num_prompts} prompts x {num_tokens} tokens", flush=True)
        try:
            case = run_case(suite, model, dtype, num_layers, num_prompts, num_tokens)
        except Exception:
            case = {"passed": False, "error": traceback.format_exc()}
            print(case["error"], flush=True)
        free_memory(suite.device)
        result["cases"][key] = case
        suite.partial("e2e", result)
        print(f"[e2e] {key}: passed={case['passed']} {case.get('summary', '')}", flush=True)
    result["passed"] = all(case["passed"] for case in result["cases"].values())
    return result


def run_case(
    suite: Suite,
    model_name: str,
    dtype_name: str,
    num_layers: int | None,
    num_prompts: int,
    num_tokens: int,
) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    device, seed = suite.device, suite.args.seed
    overrides: dict[str, Any] = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if num_layers is not None:
        overrides["num_hidden_layers"] = num_layers
    config = hf_config(model_name, device, **overrides)
    timings: dict[str, float] = {}

    started = time.perf_counter()
    torch.manual_seed(seed)
    with torch.device(device):  # initialised in place on the GPU: no host round trip
        reference = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype_name))
    reference.eval()
    num_bytes = sum(p.numel() * p.element_size() for p in reference.parameters())
    timings["create"] = time.perf_counter() - started

    directory = Path(tempfile.mkdtemp(prefix="kvplane-e2e-", dir=weights_parent(suite, num_bytes)))
    try:
        started = time.perf_counter()
        reference.save_pretrained(str(directory))
        timings["save"] = time.perf_counter() - started

        rng = random.Random(seed)
        max_prompt = 256 if suite.is_cuda else 40
        prompts = [
            [rng.randrange(config.vocab_size) for _ in range(rng.randint(4, max_prompt))]
            for _ in range(num_prompts)
        ]
        started = time.perf_counter()
        hf_tokens, hf_top = hf_greedy(reference, prompts, num_tokens)
        timings["hf_generate"] = time.perf_counter() - started

        kv_tokens, kv_top, engine, timings_kv = kvplane_greedy(
            suite, directory, dtype_name, prompts, num_tokens
        )
        timings.update(timings_kv)

        started = time.perf_counter()
        forced_top, forced_gaps = teacher_forced_top(reference, prompts, kv_tokens)
        timings["hf_teacher_forced"] = time.perf_counter() - started
    finally:
        del reference
        shutil.rmtree(directory, ignore_errors=True)

    per_prompt = [
        compare(len(p), h, k, ht, kt, ft, fg)
        for p, h, k, ht, kt, ft, fg in zip(
            prompts, hf_tokens, kv_tokens, hf_top, kv_top, forced_top, forced_gaps, strict=True
        )
    ]
    identical = all(row["num_equal"] == num_tokens for row in per_prompt)
    within_top5 = all(
        row["divergence_ok"] and row["forced_in_top5"] == num_tokens for row in per_prompt
    )
    if dtype_name == "float32":
        passed, criterion = identical, "float32: identical greedy tokens"
    else:
        passed = within_top5
        criterion = (
            "bf16: at the first divergence each token is in the other engine's top-5, and "
            "every kvplane token is in transformers' teacher-forced top-5"
        )
    total = num_prompts * num_tokens
    summary = {
        "identical_prompts": sum(row["num_equal"] == num_tokens for row in per_prompt),
        "equal_positions": sum(row["num_equal"] for row in per_prompt),
        "forced_in_top5_positions": sum(row["forced_in_top5"] for row in per_prompt),
        "forced_argmax_positions": sum(row["forced_argmax"] for row in per_prompt),
        "total_positions": total,
        "identical": identical,
        "within_top5": within_top5,
    }
    return {
        "model": model_name,
        "dtype": dtype_name,
        "num_layers": config.num_hidden_layers,
        "weights_bytes": num_bytes,
        "weights_dir": str(directory.parent),
        "criterion": criterion,
        "passed": passed,
        "summary": summary,
        # float32 matmuls in TF32 (torch flags, Triton tl.dot) break exact equality.
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "timings_s": timings,
        "engine": engine,
        "per_prompt": per_prompt,
    }


def hf_greedy(
    model: Any, prompts: list[list[int]], num_tokens: int
) -> tuple[list[list[int]], list[list[list[int]]]]:
    """Greedy tokens and the top-5 of the raw logits at each step, one prompt at a time
    (no padding, so nothing but the kernels differs from kvplane)."""
    import torch
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=num_tokens,
        do_sample=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    device = next(model.parameters()).device
    tokens, tops = [], []
    for prompt in prompts:
        ids = torch.tensor([prompt], device=device)  # [1, prompt_len]
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
        logits = torch.stack(out.logits, 0)[:, 0].float()  # [num_tokens, vocab]
        tokens.append(out.sequences[0, len(prompt) :].tolist())
        tops.append(logits.topk(TOP_K, dim=-1).indices.tolist())
    return tokens, tops


def kvplane_greedy(
    suite: Suite, directory: Path, dtype_name: str, prompts: list[list[int]], num_tokens: int
) -> tuple[list[list[int]], list[list[set[int]]], dict[str, Any], dict[str, float]]:
    from kvplane import LLM, SamplingParams

    options: dict[str, Any] = dict(
        device=suite.device,
        dtype=dtype_name,
        skip_tokenizer_init=True,
        # Small and explicit: the transformers model shares the device meanwhile.
        kv_cache_memory_bytes=(2 * 2**30) if suite.is_cuda else 64 * 2**20,
        max_model_len=1024,
        max_num_seqs=max(len(prompts), 1),
        enforce_eager=suite.args.enforce_eager,
        seed=suite.args.seed,
    )
    started = time.perf_counter()
    llm = LLM(model=str(directory), **options)
    load_seconds = time.perf_counter() - started
    info = engine_info(llm, options, load_seconds)
    params = SamplingParams(
        temperature=0.0, max_tokens=num_tokens, ignore_eos=True, logprobs=TOP_K, detokenize=False
    )
    started = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    generate_seconds = time.perf_counter() - started
    tokens, tops = [], []
    for output in outputs:
        completion = output.outputs[0]
        tokens.append(list(completion.token_ids))
        tops.append(
            [
                {t for t, lp in position.items() if lp.rank is not None and lp.rank <= TOP_K}
                for position in completion.logprobs or []
            ]
        )
    del llm
    free_memory(suite.device)
    return tokens, tops, info, {"kvplane_load": load_seconds, "kvplane_generate": generate_seconds}


def teacher_forced_top(
    model: Any, prompts: list[list[int]], generated: list[list[int]]
) -> tuple[list[list[list[int]]], list[list[tuple[float, float]]]]:
    """transformers' top-5 at each of ``generated``'s positions, given kvplane's prefix,
    and per position ``(logprob(argmax) - logprob(kvplane's token), logprob(argmax) -
    logprob(5th))``: how far kvplane's choice is from transformers' own, next to how
    flat transformers' top-5 is there (near-ties on random weights)."""
    import torch

    device = next(model.parameters()).device
    tops, gaps = [], []
    for prompt, tokens in zip(prompts, generated, strict=True):
        ids = torch.tensor([prompt + tokens], device=device)  # [1, prompt_len + num_tokens]
        with torch.inference_mode():
            logits = model(ids).logits[0, len(prompt) - 1 : len(prompt) - 1 + len(tokens)]
        logprobs = torch.log_softmax(logits.float(), dim=-1)  # [num_tokens, vocab]
        top = logprobs.topk(TOP_K, dim=-1)
        chosen = logprobs.gather(1, torch.tensor(tokens, device=device)[:, None])[:, 0]
        to_chosen = (top.values[:, 0] - chosen).tolist()
        spread = (top.values[:, 0] - top.values[:, -1]).tolist()
        tops.append(top.indices.tolist())
        gaps.append(list(zip(to_chosen, spread, strict=True)))
    return tops, gaps


def compare(
    prompt_len: int,
    hf_tokens: list[int],
    kv_tokens: list[int],
    hf_top: list[list[int]],
    kv_top: list[set[int]],
    forced_top: list[list[int]],
    forced_gaps: list[tuple[float, float]],
) -> dict[str, Any]:
    """Counts for one prompt; ``divergence_ok`` is the first-divergence check."""
    n = len(hf_tokens)
    if len(kv_tokens) != n or len(kv_top) != n:
        raise ValueError(f"kvplane made {len(kv_tokens)} tokens ({len(kv_top)} logprobs), not {n}")
    first = next((i for i in range(n) if hf_tokens[i] != kv_tokens[i]), None)
    row: dict[str, Any] = {
        "prompt_len": prompt_len,
        "num_equal": sum(h == k for h, k in zip(hf_tokens, kv_tokens, strict=True)),
        "first_divergence": first,
        "kv_in_hf_top5_same_position": sum(k in t for k, t in zip(kv_tokens, hf_top, strict=True)),
        "hf_in_kv_top5_same_position": sum(h in t for h, t in zip(hf_tokens, kv_top, strict=True)),
        "forced_in_top5": sum(k in t for k, t in zip(kv_tokens, forced_top, strict=True)),
        "forced_argmax": sum(k == t[0] for k, t in zip(kv_tokens, forced_top, strict=True)),
        "divergence_ok": True,
        # nats between transformers' argmax and kvplane's token, teacher-forced
        "forced_max_gap_to_argmax": max((gap for gap, _ in forced_gaps), default=0.0),
    }
    if first is not None:
        kv_ok = kv_tokens[first] in hf_top[first]
        hf_ok = hf_tokens[first] in kv_top[first]
        row["divergence"] = {
            "hf_token": hf_tokens[first],
            "kvplane_token": kv_tokens[first],
            "kvplane_in_hf_top5": kv_ok,
            "hf_in_kvplane_top5": hf_ok,
            # the same context as transformers' generation there (tokens equal so far)
            "forced_gap_to_argmax": forced_gaps[first][0],
            "forced_top5_spread": forced_gaps[first][1],
        }
        row["divergence_ok"] = kv_ok and hf_ok
    return row


def weights_parent(suite: Suite, num_bytes: int) -> str:
    """Where to save the weights: ``--weights-dir``, else the first of /dev/shm (fast) and
    the temp folder with room for them."""
    if suite.args.weights_dir:
        return suite.args.weights_dir
    for candidate in ("/dev/shm", tempfile.gettempdir()):
        try:
            if shutil.disk_usage(candidate).free > 1.3 * num_bytes + 2**30:
                return candidate
        except OSError:
            continue
    return tempfile.gettempdir()
