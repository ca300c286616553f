"""Configs of well-known models by short name, for benchmarks with random weights.

``LLM(model="qwen3-0.6b", load_format="dummy")`` and ``kvplane bench --dummy NAME`` need
no files at all: the shapes below are the published ones of each model's config.json
(hidden sizes, layer and head counts, vocabulary, rope settings). They carry no tokenizer,
so prompts are token ids.
"""

from __future__ import annotations

from typing import Any

#: name -> (transformers config class, keyword arguments).
BUILTIN_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen3-0.6b": (
        "Qwen3Config",
        dict(
            architectures=["Qwen3ForCausalLM"],
            vocab_size=151936,
            hidden_size=1024,
            intermediate_size=3072,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
            max_position_embeddings=40960,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            tie_word_embeddings=True,
            dtype="bfloat16",
        ),
    ),
    "llama-3-8b": (
        "LlamaConfig",
        dict(
            architectures=["LlamaForCausalLM"],
            vocab_size=128256,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            max_position_embeddings=8192,
            rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
            tie_word_embeddings=False,
            dtype="bfloat16",
        ),
    ),
    "llama-3.2-1b": (
        "LlamaConfig",
        dict(
            architectures=["LlamaForCausalLM"],
            vocab_size=128256,
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=64,
            max_position_embeddings=131072,
            rms_norm_eps=1e-5,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 32.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
            tie_word_embeddings=True,
            dtype="bfloat16",
        ),
    ),
    "qwen3-30b-a3b": (
        "Qwen3MoeConfig",
        dict(
            architectures=["Qwen3MoeForCausalLM"],
            vocab_size=151936,
            hidden_size=2048,
            intermediate_size=6144,
            moe_intermediate_size=768,
            num_experts=128,
            num_experts_per_tok=8,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            num_hidden_layers=48,
            num_attention_heads=32,
            num_key_value_heads=4,
            head_dim=128,
            max_position_embeddings=40960,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            tie_word_embeddings=False,
            dtype="bfloat16",
        ),
    ),
}


def builtin_config_names() -> list[str]:
    return sorted(BUILTIN_CONFIGS)


def builtin_config(name: str) -> Any:
    """The transformers config of built-in model ``name``."""
    import transformers

    if name not in BUILTIN_CONFIGS:
        raise ValueError(
            f"no built-in config named {name!r}; known: {', '.join(builtin_config_names())}"
        )
    class_name, options = BUILTIN_CONFIGS[name]
    return getattr(transformers, class_name)(**options)
