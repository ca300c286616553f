"""Conversations to prompt token ids with the model's chat template (chat and /tokenize)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from kvplane.server.errors import bad_request
from kvplane.server.protocol import ChatMessage
from kvplane.server.state import ServerState

# Keyword arguments of apply_chat_template that chat_template_kwargs may not override.
_RESERVED_TEMPLATE_KWARGS = frozenset(
    {"conversation", "tools", "tokenize", "add_generation_prompt", "continue_final_message",
     "chat_template", "return_dict", "return_tensors"}
)  # fmt: skip


def render_conversation(
    state: ServerState,
    messages: Sequence[ChatMessage],
    tools: list[dict[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    template_kwargs: Mapping[str, Any] | None = None,
) -> list[int]:
    """The prompt token ids of a conversation under the model's chat template."""
    tokenizer = state.require_tokenizer()
    conversation = [_template_message(index, message) for index, message in enumerate(messages)]
    extra = dict(template_kwargs or {})
    reserved = sorted(_RESERVED_TEMPLATE_KWARGS & extra.keys())
    if reserved:
        raise bad_request(f"chat_template_kwargs may not set {reserved}", "chat_template_kwargs")
    try:
        token_ids = tokenizer.apply_chat_template(
            conversation,
            tools=tools,
            chat_template=state.chat_template,
            add_generation_prompt=add_generation_prompt and not continue_final_message,
            continue_final_message=continue_final_message,
            tokenize=True,
            **extra,
        )
    except Exception as error:  # jinja errors, a template that rejects the roles...
        raise bad_request(f"the chat template failed: {error}", "messages") from error
    if isinstance(token_ids, Mapping):  # transformers 5 returns a BatchEncoding
        token_ids = token_ids["input_ids"]
    return [int(token_id) for token_id in token_ids]


def _template_message(index: int, message: ChatMessage) -> dict[str, Any]:
    result = message.model_dump(exclude_none=True)
    if message.role == "developer":
        result["role"] = "system"
    content = message.content
    if isinstance(content, list):
        texts = []
        for part_index, part in enumerate(content):
            if part.type != "text" or part.text is None:
                raise bad_request(
                    f"only text content parts are supported, got type {part.type!r}",
                    f"messages.{index}.content.{part_index}",
                )
            texts.append(part.text)
        content = "\n".join(texts)
    result["content"] = content or ""
    for call in result.get("tool_calls", []):
        # Templates index the arguments as a mapping; OpenAI sends them as JSON text.
        function = call.get("function")
        if isinstance(function, dict) and isinstance(function.get("arguments"), str):
            try:
                function["arguments"] = json.loads(function["arguments"])
            except json.JSONDecodeError:
                pass
    return result
