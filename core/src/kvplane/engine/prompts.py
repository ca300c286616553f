"""Prompts in every accepted form, to token ids, and the checks every prompt passes.

Shared by the engine and the server-side client (:class:`~kvplane.engine.async_llm.AsyncLLM`),
which tokenizes and checks before a request crosses to the engine.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from typing import Any

#: A prompt: text, token ids, or a dict with "prompt" or "prompt_token_ids".
PromptType = str | Sequence[int] | Mapping[str, Any]


def tokenize_prompt(tokenizer: Any | None, prompt: PromptType) -> tuple[str | None, list[int]]:
    """Return ``(prompt text or None, prompt token ids)`` for any accepted form. Token
    ids must be integers (numpy's too): ``TypeError`` for floats or strings."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("text prompts need a tokenizer, and this engine has none")
        return prompt, tokenizer.encode(prompt)
    if isinstance(prompt, Mapping):
        if "prompt_token_ids" in prompt:
            return prompt.get("prompt"), list(map(operator.index, prompt["prompt_token_ids"]))
        if "prompt" in prompt:
            return tokenize_prompt(tokenizer, str(prompt["prompt"]))
        raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
    return None, list(map(operator.index, prompt))


def validate_prompt(prompt_token_ids: list[int], max_model_len: int, vocab_size: int) -> None:
    """``ValueError`` for an empty prompt, one that leaves no room to generate, or ids
    outside the vocabulary."""
    if not prompt_token_ids:
        raise ValueError("the prompt is empty")
    if len(prompt_token_ids) >= max_model_len:
        raise ValueError(
            f"the prompt has {len(prompt_token_ids)} tokens, but the context is "
            f"{max_model_len} tokens and at least one must be generated"
        )
    # min and max run in C: the offline API checks hundreds of long prompts at once.
    if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= vocab_size:
        bad = [t for t in prompt_token_ids if not 0 <= t < vocab_size]
        raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
