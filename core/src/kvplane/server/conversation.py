"""Conversations to prompt token ids with the model's chat template (chat and /tokenize).

The template is rendered and its text tokenized on a tokenizer-pool thread; a rendered
text too long to fit the context is refused before it is tokenized.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

from kvplane.server.errors import bad_request
from kvplane.server.protocol import ChatMessage
from kvplane.server.state import ServerState
from kvplane.server.tokenizer_pool import Encoded, TokenizerPool, TokenizerWorker

# Keyword arguments of apply_chat_template that chat_template_kwargs may not override.
_RESERVED_TEMPLATE_KWARGS = frozenset(
    {"conversation", "tools", "tokenize", "add_generation_prompt", "continue_final_message",
     "chat_template", "return_dict", "return_tensors"}
)  # fmt: skip
# Keyword arguments of apply_chat_template that change how it tokenizes its text: with
# one of them, transformers tokenizes (rather than the worker).
_TOKENIZING_KWARGS = frozenset(
    {"sanitize_control_tokens", "padding", "truncation", "max_length", "tokenizer_kwargs",
     "return_assistant_tokens_mask"}
)  # fmt: skip


async def render_conversation(
    state: ServerState,
    messages: Sequence[ChatMessage],
    tools: list[dict[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    template_kwargs: Mapping[str, Any] | None = None,
    *,
    within_context: bool = True,
) -> list[int]:
    """The prompt token ids of a conversation under the model's chat template. 400 when
    they cannot fit the context; without ``within_context`` (``/tokenize``), only when the
    rendered text is too long to fit whatever its tokens."""
    pool = state.require_tokenizer_pool()
    conversation = [_template_message(index, message) for index, message in enumerate(messages)]
    extra = dict(template_kwargs or {})
    reserved = sorted(_RESERVED_TEMPLATE_KWARGS & extra.keys())
    if reserved:
        raise bad_request(f"chat_template_kwargs may not set {reserved}", "chat_template_kwargs")
    options = {
        "tools": tools,
        "chat_template": state.chat_template,
        "add_generation_prompt": add_generation_prompt and not continue_final_message,
        "continue_final_message": continue_final_message,
        **extra,
    }
    max_num_ids = pool.max_model_len - 1 if within_context else None
    encoded = await pool.run(partial(_render, pool, conversation, options, max_num_ids))
    if within_context:
        return pool.check_fits(encoded, "messages")
    assert encoded.token_ids is not None
    return encoded.token_ids


def _render(
    pool: TokenizerPool,
    conversation: list[dict[str, Any]],
    options: dict[str, Any],
    max_num_ids: int | None,
    worker: TokenizerWorker,
) -> Encoded:
    """Render, check the text's length, tokenize (on a pool thread)."""
    tokenizing = _TOKENIZING_KWARGS & options.keys()
    text_options = {key: value for key, value in options.items() if key not in tokenizing}
    text = _apply_template(worker.tokenizer, conversation, text_options, tokenize=False)
    pool.check_length(text, "messages")
    if tokenizing:
        token_ids = _apply_template(worker.tokenizer, conversation, options, tokenize=True)
        if isinstance(token_ids, Mapping):  # transformers 5 returns a BatchEncoding
            token_ids = token_ids["input_ids"]
        return Encoded(len(token_ids), [int(token_id) for token_id in token_ids])
    # What apply_chat_template(tokenize=True) does: the text, without special tokens added.
    return worker.encode(text, add_special_tokens=False, max_num_ids=max_num_ids)


def _apply_template(
    tokenizer: Any, conversation: list[dict[str, Any]], options: dict[str, Any], tokenize: bool
) -> Any:
    try:
        return tokenizer.apply_chat_template(conversation, tokenize=tokenize, **options)
    except Exception as error:  # jinja errors, a template that rejects the roles...
        raise bad_request(f"the chat template failed: {error}", "messages") from error


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
