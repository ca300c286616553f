"""Compiling constraints against SmolLM2's vocabulary and matching token by token."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import torch

from kvplane.ops import Ops, reference_ops
from kvplane.sampling import Sampler, SamplingParams, SequenceSamplingState
from kvplane.sampling.sampler import unpack_bitmask
from kvplane.structured import (
    GrammarConstraint,
    StructuredOutputCompiler,
    StructuredOutputParams,
    num_bitmask_words,
    tokenizer_info,
)

from .conftest import EOS_TOKEN_ID, VOCAB_SIZE


def allowed_ids(constraint: GrammarConstraint, output_ids: list[int]) -> set[int] | None:
    packed = constraint(output_ids)
    if packed is None:
        return None
    assert packed.dtype == torch.int32 and packed.shape == (num_bitmask_words(VOCAB_SIZE),)
    mask = unpack_bitmask(packed.unsqueeze(0), VOCAB_SIZE)[0]  # [VOCAB_SIZE] bool
    return set(torch.nonzero(mask).flatten().tolist())


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (StructuredOutputParams(json_schema={"type": "nonsense"}), 'Unsupported type "nonsense"'),
        (
            StructuredOutputParams(json_schema={"$ref": "#/$defs/missing"}),
            "invalid json_schema",
        ),
        (StructuredOutputParams(regex="(ab"), "parenthesis is not closed"),
        (StructuredOutputParams(grammar="root ::= undefined_rule"), "is not defined"),
        (StructuredOutputParams(structural_tag={"type": "structural_tag"}), "structural_tag"),
    ],
)
def test_invalid_constraints_raise_value_error(
    compiler: StructuredOutputCompiler, params: StructuredOutputParams, message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        compiler.compile(params)
    assert "/project/" not in str(info.value)  # xgrammar's C++ source location is stripped


def test_compiled_grammars_are_cached(
    compiler: StructuredOutputCompiler, smollm_tokenizer: Any
) -> None:
    schema = {"type": "object", "properties": {"cached": {"type": "boolean"}}}
    first = compiler.compile(StructuredOutputParams(json_schema=schema))
    again = compiler.compile(StructuredOutputParams(json_schema=json.dumps(schema)))
    assert again is first
    info = tokenizer_info(smollm_tokenizer, VOCAB_SIZE, [EOS_TOKEN_ID])
    assert tokenizer_info(smollm_tokenizer, VOCAB_SIZE, [EOS_TOKEN_ID]) is info
    other = StructuredOutputCompiler(smollm_tokenizer, VOCAB_SIZE, [EOS_TOKEN_ID])
    assert other._info is info  # the vocabulary is scanned once per tokenizer


@pytest.mark.parametrize(
    ("regex", "text"),
    [
        (r"(yes|no)( please)?", "yes please"),
        (r"\d{3}-\d{2,4}", "123-4567"),
        (r"[a-z]+@[a-z]+\.(com|org)", "ada@example.org"),
    ],
)
def test_regex_eos_exactly_when_complete(
    compiler: StructuredOutputCompiler, smollm_tokenizer: Any, regex: str, text: str
) -> None:
    token_ids = smollm_tokenizer.encode(text)
    constraint = compiler.new_constraint(StructuredOutputParams(regex=regex))
    output: list[int] = []
    for token_id in [*token_ids, None]:
        allowed = allowed_ids(constraint, output)
        assert allowed is not None
        prefix = smollm_tokenizer.decode(output)
        assert (EOS_TOKEN_ID in allowed) == (re.fullmatch(regex, prefix) is not None), prefix
        if token_id is not None:
            assert token_id in allowed, (prefix, smollm_tokenizer.decode([token_id]))
            output.append(token_id)
    assert constraint.is_completed


def test_complete_grammar_forces_eos(
    compiler: StructuredOutputCompiler, smollm_tokenizer: Any
) -> None:
    constraint = compiler.new_constraint(StructuredOutputParams(json_object=True))
    output = smollm_tokenizer.encode('{"a": [1, 2], "b": {"c": null}}')
    assert allowed_ids(constraint, output) == {EOS_TOKEN_ID}
    fresh = compiler.new_constraint(StructuredOutputParams(json_object=True))
    allowed_at_start = allowed_ids(fresh, [])
    assert allowed_at_start is not None and EOS_TOKEN_ID not in allowed_at_start
    assert smollm_tokenizer.encode("{")[0] in allowed_at_start
    assert smollm_tokenizer.encode("[")[0] not in allowed_at_start  # an object, not any JSON


def test_constraint_feeds_only_new_tokens(
    compiler: StructuredOutputCompiler, smollm_tokenizer: Any
) -> None:
    constraint = compiler.new_constraint(StructuredOutputParams(regex="abcabc"))
    output = smollm_tokenizer.encode("abc")
    first = allowed_ids(constraint, output)
    assert allowed_ids(constraint, output) == first  # same list again: nothing re-fed
    assert constraint.num_tokens_fed == len(output)
    with pytest.raises(ValueError, match="shrank"):
        constraint(output[:-1])
    output.append(EOS_TOKEN_ID)  # not allowed here: the rest goes unconstrained
    assert constraint(output) is None and constraint.is_failed


def test_constraint_ends_after_eos(
    compiler: StructuredOutputCompiler, smollm_tokenizer: Any
) -> None:
    constraint = compiler.new_constraint(StructuredOutputParams(regex="ok"))
    output = [*smollm_tokenizer.encode("ok"), EOS_TOKEN_ID]
    assert constraint(output) is None  # ignore_eos only: the grammar has ended
    assert constraint.is_terminated and not constraint.is_failed
    assert constraint([*output, 100]) is None


def test_unpack_bitmask_matches_xgrammar() -> None:
    xgr = pytest.importorskip("xgrammar")
    vocab_size = 70  # not a multiple of 32
    generator = torch.Generator().manual_seed(0)
    packed = torch.randint(-(2**31), 2**31, (3, num_bitmask_words(vocab_size)), generator=generator)
    packed = packed.to(torch.int32)  # [3, 3]
    logits = torch.zeros(3, vocab_size)
    xgr.apply_token_bitmask_inplace(logits, packed, vocab_size=vocab_size)
    expected = logits != float("-inf")
    assert torch.equal(unpack_bitmask(packed, vocab_size), expected)


def test_sampler_applies_bool_and_packed_masks_in_one_batch() -> None:
    vocab_size = 70
    sampler = Sampler(Ops(**reference_ops()), vocab_size)
    logits = torch.randn(4, vocab_size, generator=torch.Generator().manual_seed(1))
    bool_allowed = [3, 40]
    packed_allowed = [1, 33, 69]

    def bool_mask(output_ids: Any) -> torch.Tensor:
        mask = torch.zeros(vocab_size, dtype=torch.bool)
        mask[bool_allowed] = True
        return mask

    def packed_mask(output_ids: Any) -> torch.Tensor:
        packed = torch.zeros(num_bitmask_words(vocab_size), dtype=torch.int32)
        for token_id in packed_allowed:
            packed[token_id // 32] |= 1 << (token_id % 32)
        return packed

    states = [
        SequenceSamplingState(SamplingParams(temperature=0.0), [1], [], allowed_mask_fn=fn)
        for fn in (packed_mask, None, bool_mask, packed_mask)
    ]
    sampled = sampler(logits, states).sampled_token_ids

    def best(row: int, allowed: list[int]) -> int:
        return allowed[int(logits[row, allowed].argmax())]

    assert sampled == [
        best(0, packed_allowed),
        int(logits[1].argmax()),
        best(2, bool_allowed),
        best(3, packed_allowed),
    ]
