"""Request bodies of the OpenAI-compatible API, as pydantic models.

Field names, types and defaults are OpenAI's; vLLM's extra sampling fields (``top_k``,
``min_p``, ``repetition_penalty``, ``ignore_eos``, ``min_tokens``...) are accepted too.
Every number has the range the engine can represent, declared here so that a bad value
is a 400 whose ``param`` names it and the OpenAPI schema shows the range. Validation is
strict (``true`` is not a token id, ``"5"`` not a count) and every string must be valid
Unicode (a lone UTF-16 surrogate, which JSON's ``\\ud800`` escapes can carry, is refused
before it reaches a tokenizer). Unknown fields are ignored, as OpenAI's SDKs may send
newer ones.

Limits that depend on the server (the vocabulary, ``--max-num-seqs``, ``--max-logprobs``,
the context length) are checked by the handlers; the fields carry a
:data:`LIMIT_KEY` marker that :mod:`kvplane.server.openapi` turns into the schema's
bound for this server.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

#: Roles a chat message may have ("developer" is OpenAI's newer name for "system").
ROLES = ("system", "developer", "user", "assistant", "tool")

#: The engine keeps integers (token ids, seeds, counts) in 64-bit signed tensors.
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
#: The largest integer every JSON reader holds exactly (JavaScript's
#: ``Number.MAX_SAFE_INTEGER``): the bound of counts, ids and priorities, which never
#: need more. Only ``seed`` takes the whole int64 range, as in vLLM.
MAX_SAFE_INT = 2**53 - 1

#: Schema key naming the server limit that bounds a field (see the module docstring).
LIMIT_KEY = "x-kvplane-limit"


def _limit(name: str) -> dict[str, Any]:
    return {LIMIT_KEY: name}


def _whole_number(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


# JSON Schema's integers include 4.0 (strict validation alone would refuse it). Goes
# after the constraints in ``Annotated``, or the schema loses them.
_AS_INTEGER = BeforeValidator(_whole_number)
#: A token id: below the vocabulary size (checked by the handlers and the engine).
TokenId = Annotated[
    int, Field(ge=0, le=MAX_SAFE_INT, json_schema_extra=_limit("token_id")), _AS_INTEGER
]
#: A token id as a JSON object key (``logit_bias``): decimal, no sign or leading zeros.
TokenIdKey = Annotated[
    str,
    StringConstraints(pattern=r"^(0|[1-9][0-9]{0,18})$"),
    Field(json_schema_extra=_limit("token_id_key")),
]
#: OpenAI's range for a logit bias: -100 bans a token, 100 makes it all but certain.
LogitBias = Annotated[float, Field(ge=-100.0, le=100.0)]
#: A prompt given as token ids: at least one, fewer than the context length.
TokenIds = Annotated[list[TokenId], Field(min_length=1, json_schema_extra=_limit("prompt_ids"))]
#: A prompt as text (an empty one leaves the model nothing to continue).
PromptText = Annotated[str, StringConstraints(min_length=1)]
#: A stop string; an empty one would match everywhere.
StopString = Annotated[str, StringConstraints(min_length=1)]
#: How many logprobs to return per token (at most ``--max-logprobs``).
NumLogprobs = Annotated[
    int, Field(ge=0, le=MAX_SAFE_INT, json_schema_extra=_limit("max_logprobs")), _AS_INTEGER
]
#: How many sequences to run for one prompt (at most ``--max-num-seqs``).
NumSequences = Annotated[
    int, Field(ge=1, le=MAX_SAFE_INT, json_schema_extra=_limit("max_num_seqs")), _AS_INTEGER
]
#: The most tokens to generate (``max_tokens``), and the fewest (``min_tokens``).
NumTokens = Annotated[int, Field(ge=1, le=MAX_SAFE_INT), _AS_INTEGER]
MinTokens = Annotated[int, Field(ge=0, le=MAX_SAFE_INT), _AS_INTEGER]
#: vLLM's top_k: 0 or -1 for no limit.
TopK = Annotated[int, Field(ge=-1, le=MAX_SAFE_INT), _AS_INTEGER]
#: A request's priority (smaller runs first).
Priority = Annotated[int, Field(ge=-MAX_SAFE_INT, le=MAX_SAFE_INT), _AS_INTEGER]
#: vLLM's range of seeds (torch.long); the n sequences of a request use seed, seed + 1...
Seed = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX), _AS_INTEGER]


def _lone_surrogate_at(value: Any, path: str = "") -> tuple[str, str] | None:
    """Where in ``value`` (strings, lists, dict keys and values) a lone surrogate is, and
    which one; None when there is none. Nested models check their own fields."""
    if isinstance(value, str):
        # Encoding is the fast scan (a regex over a 15 MB prompt held the loop 0.3 s).
        if value.isascii():
            return None
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as error:
            return path, value[error.start]
        return None
    items: list[tuple[str, Any]] = []
    if isinstance(value, list | tuple):
        items = [(f"{path}.{index}", item) for index, item in enumerate(value)]
    elif isinstance(value, dict):
        for key, item in value.items():
            items += [(f"{path}.{key}", key), (f"{path}.{key}", item)]
    for item_path, item in items:
        found_at = _lone_surrogate_at(item, item_path)
        if found_at is not None:
            return found_at
    return None


def _escaped(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _check_unicode(value: Any) -> None:
    found = _lone_surrogate_at(value)
    if found is None:
        return
    path, surrogate = found
    raise PydanticCustomError(
        "invalid_unicode",
        "a lone UTF-16 surrogate (U+{code}{where}) is not Unicode text",
        # The path may hold the surrogate too (a dict key): escaped, so the message encodes.
        {"code": f"{ord(surrogate):04X}", "where": f" at {_escaped(path[1:])}" if path else ""},
    )


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _text_is_unicode(cls, value: Any) -> Any:
        _check_unicode(value)
        return value

    @model_validator(mode="after")
    def _extra_text_is_unicode(self) -> _Request:
        # Kept extra fields (a chat message's) go to the chat template: check them too.
        for name, value in (self.__pydantic_extra__ or {}).items():
            _check_unicode({name: value})
        return self


class StreamOptions(_Request):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class JSONSchemaFormat(_Request):
    """``response_format.json_schema``: the output validates against ``schema``."""

    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class TextFormat(_Request):
    type: Literal["text"]


class JSONObjectFormat(_Request):
    type: Literal["json_object"]


class JSONSchemaResponseFormat(_Request):
    type: Literal["json_schema"]
    json_schema: JSONSchemaFormat


class StructuralTagFormat(_Request):
    """vLLM's ``{"type": "structural_tag", "format": {...}}`` (xgrammar's structural tag)."""

    model_config = ConfigDict(extra="allow")

    type: Literal["structural_tag"]


ResponseFormat = Annotated[
    TextFormat | JSONObjectFormat | JSONSchemaResponseFormat | StructuralTagFormat,
    Field(discriminator="type"),
]


class StructuredOutputs(_Request):
    """vLLM's ``structured_outputs``: one constraint (the others left out, null or false)."""

    model_config = ConfigDict(extra="forbid")

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    json_schema: dict[str, Any] | str | None = None
    json_object: bool | None = None
    regex: str | None = None
    grammar: str | None = None
    choice: Annotated[list[str], Field(min_length=1)] | None = None
    structural_tag: dict[str, Any] | str | None = None


class _SamplingFields(_Request):
    """Fields shared by completions and chat completions."""

    model: str | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: NumSequences = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopString | list[StopString] | None = None
    seed: Seed | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[TokenIdKey, LogitBias] | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None
    # vLLM's extras
    top_k: TopK | None = Field(None, description="0 or -1: no limit")
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    ignore_eos: bool = False
    min_tokens: MinTokens = Field(0, description="at most max_tokens")
    stop_token_ids: list[TokenId] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    allowed_token_ids: list[TokenId] | None = Field(None, min_length=1)
    structured_outputs: StructuredOutputs | None = None
    priority: Priority = Field(0, description="smaller runs first")

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_SamplingFields):
    """``POST /v1/completions``."""

    prompt: (
        PromptText
        | Annotated[list[PromptText], Field(min_length=1)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1)]
    )
    max_tokens: NumTokens | None = 16
    logprobs: NumLogprobs | None = None
    echo: bool = False
    best_of: NumSequences | None = Field(None, description="only equal to n")
    suffix: Annotated[str, StringConstraints(max_length=0)] | None = Field(
        None, description="not supported: empty or null only"
    )
    prompt_logprobs: NumLogprobs | None = None
    add_special_tokens: bool = True


class TextPart(_Request):
    """A content part; only ``type="text"`` is supported."""

    model_config = ConfigDict(extra="allow")

    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    """One message; unknown fields are kept and passed on to the chat template."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class FunctionDefinition(_Request):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(_Request):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"] = "function"
    function: NamedFunction


class ChatCompletionRequest(_SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: NumTokens | None = None
    max_completion_tokens: NumTokens | None = None
    logprobs: bool = False
    top_logprobs: NumLogprobs | None = Field(None, description="needs logprobs=true")
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    # vLLM's extras
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None


def _one_of_prompt_and_messages(schema: dict[str, Any]) -> None:
    """The schema says what the handler checks: exactly one of the two is given."""
    schema["anyOf"] = [
        {
            "required": ["prompt"],
            "properties": {"prompt": {"type": "string"}, "messages": {"type": "null"}},
        },
        {
            "required": ["messages"],
            "properties": {"messages": {"type": "array"}, "prompt": {"type": "null"}},
        },
    ]


class TokenizeRequest(_Request):
    """``POST /tokenize``: a ``prompt`` or chat ``messages``."""

    model_config = ConfigDict(json_schema_extra=_one_of_prompt_and_messages)

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(_Request):
    """``POST /detokenize``."""

    model: str | None = None
    tokens: list[TokenId]
