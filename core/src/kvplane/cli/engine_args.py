"""Every :class:`~kvplane.config.EngineConfig` option as a command-line flag.

Shared by ``generate``, ``serve`` and ``bench`` so a new engine option appears in all of
them at once. Flags are derived from the dataclass fields: ``max_num_seqs`` becomes
``--max-num-seqs``; booleans become ``--flag`` / ``--no-flag``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from collections.abc import Callable
from typing import Any, get_type_hints

from kvplane.config import INTERNAL_FIELDS, EngineConfig

#: Help text per option (the field name is the key).
_HELP = {
    "model": "local HF model directory or .gguf file (default: embedded SmolLM2-135M-Instruct)",
    "device": "platform name (see `kvplane platforms`; default: best available)",
    "emulate": "run platform NAME through its emulation on a host without its hardware "
    "(selects it; see `kvplane platforms`)",
    "dtype": "auto, float32, bfloat16 or float16",
    "quantization": "quantization method for linear layers: fp8, int8, gptq or awq "
    "quantize a float checkpoint at load, gguf keeps a GGUF file's blocks (default: the "
    "checkpoint's quantization_config, else none)",
    "load_format": "auto (read weights) or dummy (random weights, config only)",
    "kv_cache_dtype": "what the KV cache stores: auto (the model dtype) or fp8 (alias "
    "fp8_e4m3: float8_e4m3fn with per-layer scales, 1.0 or the checkpoint's k_scale / "
    "v_scale; twice the blocks of bfloat16) (default: auto)",
    "tokenizer": "tokenizer directory, if not the model's",
    "block_size": "tokens per KV-cache block",
    "max_num_seqs": "most sequences in one step (default: 1024 on a device of 70 GiB or "
    "more, else 256)",
    "max_num_batched_tokens": "token budget of one step, chunked prefill beyond it (default: "
    "16384 offline and 8192 served on a device of 70 GiB or more, 8192 and 2048 on a smaller "
    "one, 8192 on the CPU)",
    "max_model_len": "context length (default: the model's)",
    "enable_prefix_caching": "reuse KV blocks of shared prompt prefixes",
    "gpu_memory_utilization": "fraction of device memory for weights, activations and KV",
    "kv_cache_memory_bytes": "KV-cache size in bytes (overrides gpu_memory_utilization)",
    "seed": "seed of the engine's random state",
    "enforce_eager": "never capture graphs",
    "max_mixed_graph_tokens": "largest mixed (prefill + decode) step replayed from a "
    "captured graph, in tokens (0: run them eagerly)",
    "async_scheduling": "overlap host work for the next step with the device's run of "
    "this one (default: where the platform runs asynchronously)",
    "skip_tokenizer_init": "load no tokenizer (token-id prompts only)",
    "generation_config": "sampling for the fields a request leaves out: auto (the model's "
    "recommended: its generation_config.json; temperature 0.2, top_p 0.9 for the embedded "
    "model), kvplane (the engine's own: temperature 1.0, top_p 1.0), or a directory holding "
    "a generation_config.json (default: auto)",
    "engine_process": "run the engine in a child process of the server (--no-engine-process: "
    "on a thread of the server's process; default: a child process)",
    "log_stats_interval": "seconds between the server's engine stats lines (throughput, "
    "running and waiting requests, KV-cache usage, where the engine loop's time goes); 0: "
    "none (default: 10)",
    "override_generation_config": "JSON object of generation_config.json sampling keys that "
    "win over --generation-config's, e.g. '{\"temperature\": 0.5}' (default: none)",
    "speculative_config": "speculative decoding as a JSON object, vLLM's keys: "
    '\'{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}\' '
    'or \'{"method": "draft_model", "model": PATH, "num_speculative_tokens": 4}\'; '
    "also disable_by_batch_size (default: off; see docs/speculative-decoding.md)",
}


#: Placeholders in usage lines where the field's name would not say what to give.
_METAVARS = {
    "model": "PATH",
    "tokenizer": "PATH",
    "device": "NAME",
    "emulate": "NAME",
    "generation_config": "auto|kvplane|PATH",
    "kv_cache_dtype": "auto|fp8",
    "override_generation_config": "JSON",
    "speculative_config": "JSON",
}


def add_engine_arguments(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """Add one flag per engine option (except ``skip``) to ``parser``."""
    group = parser.add_argument_group("engine options")
    hints = get_type_hints(EngineConfig)
    for field in dataclasses.fields(EngineConfig):
        if field.name in skip or field.name in INTERNAL_FIELDS:
            continue
        flag = "--" + field.name.replace("_", "-")
        help_text = _HELP.get(field.name, "")
        hint = hints[field.name]
        if hint is bool or bool in getattr(hint, "__args__", ()):  # bool or bool | None
            group.add_argument(
                flag,
                dest=field.name,
                action=argparse.BooleanOptionalAction,
                default=field.default,
                help=help_text,
            )
        else:
            group.add_argument(
                flag,
                dest=field.name,
                type=_scalar_type(hints[field.name]),
                default=field.default,
                metavar=_METAVARS.get(field.name),
                help=with_default(help_text, field.default),
            )


def engine_config_from_args(args: argparse.Namespace, **overrides: Any) -> EngineConfig:
    """Build an :class:`EngineConfig` from parsed flags (plus ``overrides``)."""
    values = {
        field.name: getattr(args, field.name)
        for field in dataclasses.fields(EngineConfig)
        if hasattr(args, field.name)
    }
    values.update(overrides)
    return EngineConfig(**values)


def with_default(help_text: str, default: object) -> str:
    """``help_text`` ending in its default, unless the text already says what it is."""
    if "default" in help_text:
        return help_text
    return f"{help_text} (default: {'none' if default is None else default})"


def _scalar_type(hint: Any) -> Callable[[str], Any]:
    arguments = getattr(hint, "__args__", ())
    if any(typing.get_origin(argument) is dict for argument in arguments):
        return _json_object
    for candidate in (int, float, str):
        if hint is candidate or candidate in arguments:
            return candidate
    return str


def _json_object(text: str) -> dict[str, Any]:
    """A flag's value parsed as a JSON object (argparse reports the error with the flag)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error}): {text!r}") from error
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object {{...}}, got {text!r}")
    return value
