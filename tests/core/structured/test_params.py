"""StructuredOutputParams: exactly one constraint, JSON checked, canonical cache keys."""

from __future__ import annotations

import pytest

from kvplane.sampling import SamplingParams
from kvplane.structured import StructuredOutputParams

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"json_object": False},
        {"json_schema": SCHEMA, "regex": "a+"},
        {"json_object": True, "grammar": 'root ::= "a"'},
    ],
)
def test_exactly_one_constraint(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputParams(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "kind"),
    [
        ({"json_schema": SCHEMA}, "json_schema"),
        ({"json_schema": {}}, "json_schema"),  # the empty schema: any JSON value
        ({"json_object": True}, "json_object"),
        ({"regex": r"\d+"}, "regex"),
        ({"grammar": 'root ::= "yes" | "no"'}, "grammar"),
        ({"structural_tag": {"type": "structural_tag", "format": {}}}, "structural_tag"),
    ],
)
def test_kind(kwargs: dict[str, object], kind: str) -> None:
    assert StructuredOutputParams(**kwargs).kind == kind  # type: ignore[arg-type]


def test_json_text_is_checked() -> None:
    with pytest.raises(ValueError, match="json_schema is not valid JSON"):
        StructuredOutputParams(json_schema='{"type": ')
    with pytest.raises(ValueError, match="must be a JSON object"):
        StructuredOutputParams(json_schema="[1, 2]")
    with pytest.raises(ValueError, match="regex must be a string"):
        StructuredOutputParams(regex=5)  # type: ignore[arg-type]


def test_key_is_canonical() -> None:
    as_dict = StructuredOutputParams(json_schema={"required": ["a"], "type": "object"})
    as_text = StructuredOutputParams(json_schema='{"type": "object", "required": ["a"]}')
    assert as_dict.key == as_text.key
    assert as_dict.key != StructuredOutputParams(json_schema={"type": "object"}).key
    assert StructuredOutputParams(regex="a").key != StructuredOutputParams(grammar="a").key


def test_from_response_format() -> None:
    from_format = StructuredOutputParams.from_response_format
    assert from_format(None) is None
    assert from_format({"type": "text"}) is None
    assert from_format({"type": "json_object"}) == StructuredOutputParams(json_object=True)
    params = from_format({"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}})
    assert params is not None and params.json_schema == SCHEMA
    with pytest.raises(ValueError, match="needs a 'json_schema' object"):
        from_format({"type": "json_schema"})
    with pytest.raises(ValueError, match="response_format type must be"):
        from_format({"type": "yaml"})


def test_sampling_params_field() -> None:
    structured = StructuredOutputParams(json_schema=SCHEMA)
    params = SamplingParams(structured_output=structured)
    clone = params.clone()
    assert clone.structured_output == structured
    assert clone.structured_output is not structured
    assert SamplingParams().structured_output is None
    with pytest.raises(ValueError, match="must be a StructuredOutputParams"):
        SamplingParams(structured_output={"json_object": True})  # type: ignore[arg-type]
