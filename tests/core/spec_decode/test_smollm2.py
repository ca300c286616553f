"""Speculative decoding on SmolLM2-135M (the embedded model, float32): greedy text and
tokens identical to no speculation with the n-gram proposer and with SmolLM2 drafting
for itself (which accepts every draft), stop strings inside drafts included."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kvplane import LLM, SamplingParams
from kvplane.models.source import default_model_path
from tests.core.engine.conftest import PROMPTS, assert_no_block_leak, make_llm

pytestmark = pytest.mark.slow

PASSAGE = (
    "The old lighthouse stood on the northern cliff for two hundred years. Every night "
    "its keeper climbed the spiral stairs, trimmed the wick and watched the ships pass "
    "safely through the narrow channel below."
)
#: Prompts whose output repeats what they quote (the n-gram proposer's best case).
QUOTING = [
    f"Repeat the following passage word for word.\n\nPassage: {PASSAGE}\n\nRepeated: ",
    f"{PASSAGE}\n\nQuote the first sentence of the text above exactly: ",
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=48)


@pytest.fixture(scope="module")
def ngram_llm() -> Iterator[LLM]:
    llm = make_llm(
        speculative_config={"method": "ngram", "num_speculative_tokens": 4,
                            "prompt_lookup_min": 2, "prompt_lookup_max": 4}
    )  # fmt: skip
    yield llm
    assert_no_block_leak(llm)


def outputs_of(llm: LLM, prompts: list[str], params: SamplingParams) -> list[tuple[object, ...]]:
    return [
        (tuple(c.token_ids), c.text, c.finish_reason, c.stop_reason)
        for c in (o.outputs[0] for o in llm.generate(prompts, params))
    ]


def test_ngram_greedy_is_identical(smollm_llm: LLM, ngram_llm: LLM) -> None:
    prompts = PROMPTS + QUOTING
    assert outputs_of(ngram_llm, prompts, GREEDY) == outputs_of(smollm_llm, prompts, GREEDY)
    stats = ngram_llm.engine.stats().spec_decode
    assert stats is not None and stats.method == "ngram"
    assert stats.num_accepted_tokens > 20 and stats.mean_accepted_length > 1.5


def test_stop_strings_and_lengths_inside_drafts(smollm_llm: LLM, ngram_llm: LLM) -> None:
    for params in (
        SamplingParams(temperature=0.0, max_tokens=48, stop=["lighthouse", "stairs"]),
        SamplingParams(temperature=0.0, max_tokens=48, stop=["ships"],
                       include_stop_str_in_output=True),
        SamplingParams(temperature=0.0, max_tokens=9),
    ):  # fmt: skip
        assert outputs_of(ngram_llm, QUOTING, params) == outputs_of(smollm_llm, QUOTING, params)


def test_smollm2_drafting_for_itself_accepts_everything(smollm_llm: LLM) -> None:
    llm = make_llm(
        speculative_config={"method": "draft_model", "model": str(default_model_path()),
                            "num_speculative_tokens": 3}
    )  # fmt: skip
    prompts = PROMPTS[:4] + QUOTING[:1]
    params = SamplingParams(temperature=0.0, max_tokens=32)
    assert outputs_of(llm, prompts, params) == outputs_of(smollm_llm, prompts, params)
    stats = llm.engine.stats().spec_decode
    assert stats is not None and stats.num_draft_tokens > 0
    assert stats.acceptance_rate == 1.0
    assert_no_block_leak(llm)
