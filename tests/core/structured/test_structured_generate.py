"""Constrained generation with the real SmolLM2: outputs parse, validate and end with EOS."""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import pytest

from kvplane import LLM
from kvplane.sampling import SamplingParams
from kvplane.server.tool_parsers import TOOL_PARSERS
from kvplane.structured import StructuredOutputParams

PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "city": {"type": "string", "enum": ["Paris", "London", "Tokyo"]},
    },
    "required": ["name", "age", "city"],
}
PHONE_REGEX = r"\(\d{3}\) \d{3}-\d{4}"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 20},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city", "unit"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {
                "type": "object",
                "properties": {"timezone": {"type": "string", "maxLength": 20}},
                "required": ["timezone"],
            },
        },
    },
]


def chat(llm: LLM, message: str, system: str | None = None) -> str:
    messages = [{"role": "user", "content": message}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    prompt = llm.get_tokenizer().apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    assert isinstance(prompt, str)
    return prompt


def greedy(max_tokens: int, structured: StructuredOutputParams | None = None) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, structured_output=structured)


def test_constrained_and_unconstrained_in_one_batch(structured_llm: LLM) -> None:
    llm = structured_llm
    free_prompt = chat(llm, "Name a fruit.")
    prompts = [
        chat(llm, "Describe Alice, 30, from Paris, as JSON."),
        chat(llm, "Describe a cat as JSON with keys name and age."),
        chat(llm, "What is a US phone number?"),
        free_prompt,
    ]
    params = [
        greedy(40, StructuredOutputParams(json_schema=PERSON_SCHEMA)),
        greedy(32, StructuredOutputParams(json_object=True)),
        greedy(20, StructuredOutputParams(regex=PHONE_REGEX)),
        greedy(8),
    ]
    schema_out, object_out, regex_out, free_out = [
        output.outputs[0] for output in llm.generate(prompts, params)
    ]
    for constrained in (schema_out, object_out, regex_out):
        assert constrained.finish_reason == "stop", constrained.text  # EOS, not max_tokens
    jsonschema.validate(json.loads(schema_out.text), PERSON_SCHEMA)
    assert isinstance(json.loads(object_out.text), dict)
    assert re.fullmatch(PHONE_REGEX, regex_out.text), regex_out.text
    # The unconstrained row is untouched by its neighbours' masks.
    alone = llm.generate([free_prompt], greedy(8))[0].outputs[0]
    assert free_out.token_ids == alone.token_ids


def test_sampled_sequences_each_follow_the_schema(structured_llm: LLM) -> None:
    params = SamplingParams(
        n=2,
        temperature=1.0,
        seed=7,
        max_tokens=48,
        structured_output=StructuredOutputParams(json_schema=json.dumps(PERSON_SCHEMA)),
    )
    outputs = structured_llm.generate([chat(structured_llm, "Describe a person.")], params)
    for completion in outputs[0].outputs:
        assert completion.finish_reason == "stop", completion.text
        jsonschema.validate(json.loads(completion.text), PERSON_SCHEMA)


def test_invalid_schema_is_rejected_before_queueing(structured_llm: LLM) -> None:
    engine = structured_llm.engine
    bad = SamplingParams(structured_output=StructuredOutputParams(json_schema={"type": "bogus"}))
    with pytest.raises(ValueError, match="invalid json_schema"):
        engine.add_request("bad-schema", "Hello", bad)
    assert not engine.has_unfinished_requests()
    with pytest.raises(ValueError, match="invalid regex"):
        structured_llm.generate(["Hi"], greedy(4, StructuredOutputParams(regex="[z-a]")))
    assert not engine.has_unfinished_requests()


def test_tool_choice_makes_the_model_call_the_tool(structured_llm: LLM) -> None:
    """Every format, forced to a named function or "required": a parseable, valid call."""
    llm = structured_llm
    prompt = chat(llm, "What's the weather in Paris?", system="Tools: " + json.dumps(TOOLS))
    cases: list[tuple[str, Any, str | None]] = [
        ("hermes", {"type": "function", "function": {"name": "get_time"}}, "get_time"),
        ("llama3_json", "required", None),
        ("mistral", {"type": "function", "function": {"name": "get_weather"}}, "get_weather"),
    ]
    params = [
        greedy(
            64,
            TOOL_PARSERS[name]().tool_choice_constraint(TOOLS, choice, parallel_tool_calls=False),
        )
        for name, choice, _ in cases
    ]
    outputs = llm.generate([prompt] * len(cases), params)
    schemas = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
    for (name, _, expected), output in zip(cases, outputs, strict=True):
        completion = output.outputs[0]
        assert completion.finish_reason == "stop", (name, completion.text)
        content, calls = TOOL_PARSERS[name]().extract_tool_calls(completion.text)
        assert content is None and len(calls) == 1, (name, completion.text)
        assert calls[0].name in schemas and calls[0].name == (expected or calls[0].name)
        jsonschema.validate(json.loads(calls[0].arguments), schemas[calls[0].name])
