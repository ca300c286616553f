"""Sampling: per-request params, the batched sampler, stop rules and detokenization."""

from kvplane.sampling.detokenizer import IncrementalDetokenizer
from kvplane.sampling.logprobs import Logprob, SampleLogprobs, compute_prompt_logprobs
from kvplane.sampling.params import SAMPLING_EPS, SamplingParams, SamplingType
from kvplane.sampling.sampler import (
    AllowedMaskFn,
    LogitsProcessor,
    Sampler,
    SamplerOutput,
    SequenceSamplingState,
    make_generator,
)
from kvplane.sampling.stop import (
    FINISH_LENGTH,
    FINISH_STOP,
    StopChecker,
    StopResult,
    check_stop,
    text_to_emit,
)

__all__ = [
    "FINISH_LENGTH",
    "FINISH_STOP",
    "SAMPLING_EPS",
    "AllowedMaskFn",
    "IncrementalDetokenizer",
    "LogitsProcessor",
    "Logprob",
    "SampleLogprobs",
    "Sampler",
    "SamplerOutput",
    "SamplingParams",
    "SamplingType",
    "SequenceSamplingState",
    "StopChecker",
    "StopResult",
    "check_stop",
    "compute_prompt_logprobs",
    "make_generator",
    "text_to_emit",
]
