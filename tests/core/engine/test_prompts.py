"""Prompt forms and the checks every prompt passes (:mod:`kvplane.engine.prompts`)."""

from __future__ import annotations

import numpy as np
import pytest

from kvplane.engine.prompts import tokenize_prompt, validate_prompt


def test_token_id_prompts_become_plain_ints() -> None:
    text, ids = tokenize_prompt(None, {"prompt_token_ids": np.array([3, 1, 4])})
    assert (text, ids) == (None, [3, 1, 4])
    assert all(type(t) is int for t in ids)
    assert tokenize_prompt(None, (np.int32(7), 8)) == (None, [7, 8])


@pytest.mark.parametrize("bad", ["2", 1.5])
def test_non_integer_token_ids_are_refused(bad: object) -> None:
    with pytest.raises(TypeError):
        tokenize_prompt(None, [1, bad])


@pytest.mark.parametrize("bad_id", [-1, 10, 11])
def test_ids_outside_the_vocabulary_are_named(bad_id: int) -> None:
    with pytest.raises(ValueError, match=rf"token ids \[{bad_id}\] are outside the vocabulary"):
        validate_prompt([0, bad_id, 9], max_model_len=100, vocab_size=10)


def test_edge_ids_of_the_vocabulary_pass() -> None:
    validate_prompt([0, 9], max_model_len=100, vocab_size=10)


def test_a_prompt_must_leave_room_to_generate() -> None:
    with pytest.raises(ValueError, match="the prompt is empty"):
        validate_prompt([], max_model_len=4, vocab_size=10)
    with pytest.raises(ValueError, match="at least one must be generated"):
        validate_prompt([1, 2, 3, 4], max_model_len=4, vocab_size=10)
