"""Schemathesis hooks for ``test_openapi.py`` (loaded through ``SCHEMATHESIS_HOOKS``).

Before a generation request is sent, its body is made cheap, and made to follow the rules
that relate fields to each other, which JSON Schema cannot state (the schema's field
descriptions and docs/serving.md state them; test_errors.py and test_api_errors.py check
the 400s). Schemathesis revalidates an edited body, so a case these edits make valid
counts as a positive one. Everything else, every other route, and every value of a
field on its own, is as schemathesis generated it.
"""

from __future__ import annotations

from typing import Any

import schemathesis

#: Generation is the slow part: a few tokens and sequences per request keep the run short.
MAX_TOKENS = 4
MAX_SEQUENCES = 2
MAX_PROMPTS = 2
MAX_PROMPT_IDS = 16

#: Schemathesis compares integers beyond 2**53 as floats, so it takes a seed just past
#: the int64 range for a valid one; the server's 400 for it is tested in test_api_errors.py.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

_GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    body = case.body
    if case.operation.path not in _GENERATION_PATHS or not isinstance(body, dict):
        return
    _make_cheap(body, is_chat=case.operation.path.endswith("/chat/completions"))
    _relate_fields(body)


def _is_int(value: Any) -> bool:
    """An integer as the server reads it (JSON Schema's: 4.0 is one)."""
    if isinstance(value, float):
        return value.is_integer()
    return isinstance(value, int) and not isinstance(value, bool)


def _make_cheap(body: dict[str, Any], is_chat: bool) -> None:
    # Left out or null, the limit is the context (chat) or the model's default.
    names = ("max_tokens", "max_completion_tokens") if is_chat else ("max_tokens",)
    if all(body.get(name) is None for name in names):
        body["max_tokens"] = MAX_TOKENS
    for name, cap in (*((name, MAX_TOKENS) for name in names), ("n", MAX_SEQUENCES)):
        if _is_int(body.get(name)) and body[name] > cap:
            body[name] = cap
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and _is_int(prompt[0]):
        body["prompt"] = prompt[:MAX_PROMPT_IDS]
    elif isinstance(prompt, list) and prompt:
        body["prompt"] = [
            ids[:MAX_PROMPT_IDS] if isinstance(ids, list) else ids for ids in prompt[:MAX_PROMPTS]
        ]
    if _is_int(body.get("seed")):
        body["seed"] = min(max(body["seed"], INT64_MIN), INT64_MAX)


def _relate_fields(body: dict[str, Any]) -> None:
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    if _is_int(body.get("min_tokens")) and _is_int(limit):
        body["min_tokens"] = min(body["min_tokens"], limit)  # min_tokens <= max_tokens
    if _is_int(body.get("best_of")):
        body["best_of"] = body.get("n", 1)  # best_of is only accepted equal to n
    if body.get("top_logprobs") is not None:
        body["logprobs"] = True  # top_logprobs needs logprobs
    # A forced tool call compiles the tools' parameter schemas, and must name a tool;
    # tool_choice other than "none" needs tools.
    if body.get("tool_choice") is not None:
        body["tool_choice"] = "auto" if body.get("tools") else "none"
    # Any kwargs reach the chat template, which they can break.
    body.pop("chat_template_kwargs", None)
    _compilable_constraints(body)


def _compilable_constraints(body: dict[str, Any]) -> None:
    """One output constraint at most, and one the grammar engine compiles: a generated
    schema, regex or grammar need not."""
    response_format = body.get("response_format")
    if isinstance(response_format, dict):
        kind = response_format.get("type")
        if kind == "json_schema" and isinstance(response_format.get("json_schema"), dict):
            response_format["json_schema"]["schema"] = {"type": "object"}
        elif kind == "structural_tag":
            body["response_format"] = {"type": "json_object"}
    if isinstance(body.get("structured_outputs"), dict):
        if response_format is not None:
            del body["structured_outputs"]
        else:
            body["structured_outputs"] = {"choice": ["yes", "no"]}
