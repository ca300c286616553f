"""A step's outputs cross the engine-core pipe as plain tuples (``StepOutputs.__reduce__``):
every field but the prompt arrives as it left (the client puts the prompt back), and a
field added to the output classes without the wire format fails here."""

from __future__ import annotations

import dataclasses
import pickle

from kvplane.engine.engine_core import StepOutputs
from kvplane.engine.outputs import CompletionOutput, RequestOutput
from kvplane.sampling.logprobs import Logprob
from kvplane.scheduler.output import SchedulerStats

#: The fields the wire format carries, in its order: update engine_core.py with these.
REQUEST_FIELDS = (
    "request_id",
    "prompt",
    "prompt_token_ids",
    "prompt_logprobs",
    "outputs",
    "finished",
    "num_cached_tokens",
    "metrics",
    "error",
)
COMPLETION_FIELDS = (
    "index",
    "text",
    "token_ids",
    "cumulative_logprob",
    "logprobs",
    "finish_reason",
    "stop_reason",
)


def test_the_wire_format_knows_every_field() -> None:
    assert tuple(f.name for f in dataclasses.fields(RequestOutput)) == REQUEST_FIELDS
    assert tuple(f.name for f in dataclasses.fields(CompletionOutput)) == COMPLETION_FIELDS


def test_every_field_crosses() -> None:
    logprobs = {5: Logprob(-0.25, 1, " a"), 9: Logprob(-1.5, 2, " b")}
    completions = [
        CompletionOutput(0, " a", [5], -0.25, [logprobs], "stop", "\n"),
        CompletionOutput(1, " b", [9, 3], -2.0, [logprobs, logprobs], None, None),
    ]
    output = RequestOutput(
        request_id="r1",
        prompt="a prompt that stays behind",
        prompt_token_ids=[1, 2],
        prompt_logprobs=[None, logprobs],
        outputs=completions,
        finished=False,
        num_cached_tokens=16,
        metrics={"arrival_time": 1.0, "first_token_time": 2.5},
        error="ValueError: bad",
    )
    stats = SchedulerStats(3, 1, 0.5, 10, 4, 2)
    message = StepOutputs([output], stats, 2, [("r2", ValueError("too long"))])
    crossed = pickle.loads(pickle.dumps(message))
    # The prompt stays behind: the client kept it (tests/core/engine/test_engine_process.py
    # checks that streams get it back).
    assert crossed.outputs == [dataclasses.replace(output, prompt=None, prompt_token_ids=[])]
    assert b"stays behind" not in pickle.dumps(message)
    assert crossed.stats == stats and crossed.num_sequences_added == 2
    ((request_id, error),) = crossed.rejected
    assert request_id == "r2" and isinstance(error, ValueError) and str(error) == "too long"
