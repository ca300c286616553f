"""Per-request sampling parameters, named and defaulted like vLLM's so users can switch.

Validation happens once, at construction: every field a user can get wrong raises a
``ValueError`` that names the field, the accepted range and the value received.
"""

from __future__ import annotations

import copy
import enum
import math
from dataclasses import dataclass

from kvplane.structured.params import StructuredOutputParams

#: Temperatures below this are greedy (argmax), as in vLLM.
SAMPLING_EPS: float = 1e-5

# torch.Generator.manual_seed accepts exactly this range.
_MIN_SEED = -(2**63)
_MAX_SEED = 2**64 - 1


class SamplingType(enum.IntEnum):
    """How a row picks its token: argmax, a draw from the shared RNG or from its own."""

    GREEDY = 0
    RANDOM = 1
    RANDOM_SEED = 2


class RequestOutputKind(enum.IntEnum):
    """What each of a request's outputs holds (vLLM's names and values)."""

    #: Everything so far: text, token ids and logprobs from the first token on.
    CUMULATIVE = 0
    #: Only what is new since the request's previous output (prompt logprobs once).
    DELTA = 1
    #: One output, when the request has finished.
    FINAL_ONLY = 2


@dataclass(slots=True)
class SamplingParams:
    """How to sample one request's output; vLLM's names, defaults and ranges.

    After construction ``stop`` and ``stop_token_ids`` are always lists, ``logit_bias`` keys
    are ``int`` and ``top_k`` is ``0`` when disabled (``-1`` is accepted as an alias).
    ``max_tokens=None`` means "up to the model's context length". Token ids are checked
    against the vocabulary by :meth:`check_token_ids`, which the engine calls on admission
    (the params do not know the model).

    ``n > 1`` is served by the engine as ``n`` sequences; each child with a ``seed`` should
    use ``seed + index`` (as vLLM does) or all children produce the same text.
    """

    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    detokenize: bool = True
    #: Constrain the output to a JSON schema, JSON object, regex or grammar; compiled by the
    #: engine on admission (``ValueError`` if it cannot compile). See :mod:`kvplane.structured`.
    structured_output: StructuredOutputParams | None = None
    #: What each streamed output holds: the whole output so far, only what is new (each
    #: step's cost independent of the output's length), or the finished output alone.
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE

    def __post_init__(self) -> None:
        self._normalize()
        self._validate_ranges()
        self._validate_token_lists()

    # ----------------------------------------------------------------------------------
    # Derived values
    # ----------------------------------------------------------------------------------

    @property
    def sampling_type(self) -> SamplingType:
        """GREEDY when ``temperature < 1e-5``; otherwise RANDOM, or RANDOM_SEED with a seed."""
        if self.temperature < SAMPLING_EPS:
            return SamplingType.GREEDY
        if self.seed is not None:
            return SamplingType.RANDOM_SEED
        return SamplingType.RANDOM

    @property
    def has_penalties(self) -> bool:
        """Whether any of the repetition, presence or frequency penalties is active."""
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )

    def clone(self) -> SamplingParams:
        """A deep copy: lists and dicts are not shared with the original."""
        return copy.deepcopy(self)

    def check_token_ids(self, vocab_size: int) -> None:
        """Raise ``ValueError`` if a token id in these params is outside ``[0, vocab_size)``.

        Called by the engine when a request is admitted; the sampler assumes it passed
        (an out-of-range id would otherwise fail inside a device kernel, for the whole batch).
        """
        for name, ids in (
            ("stop_token_ids", self.stop_token_ids or []),
            ("allowed_token_ids", self.allowed_token_ids or []),
            ("logit_bias", list((self.logit_bias or {}).keys())),
        ):
            bad = [i for i in ids if not 0 <= i < vocab_size]
            if bad:
                raise ValueError(
                    f"{name} contains token ids outside the vocabulary [0, {vocab_size}): {bad[:8]}"
                )

    # ----------------------------------------------------------------------------------
    # Validation
    # ----------------------------------------------------------------------------------

    def _normalize(self) -> None:
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.output_kind = RequestOutputKind(self.output_kind)  # ValueError if unknown
        if self.top_k == -1:
            self.top_k = 0
        if self.logit_bias is not None:
            try:
                # JSON objects arrive with string keys ("50256": -100).
                self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
            except (TypeError, ValueError) as e:
                raise ValueError(
                    f"logit_bias must map token ids to numbers, got {self.logit_bias!r}"
                ) from e
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = list(self.allowed_token_ids)
        if self.structured_output is not None and not isinstance(
            self.structured_output, StructuredOutputParams
        ):
            raise ValueError(
                "structured_output must be a StructuredOutputParams, got "
                f"{type(self.structured_output).__name__}"
            )

    def _validate_ranges(self) -> None:
        _check(self.n >= 1, f"n must be at least 1, got {self.n}.")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(-2.0 <= value <= 2.0, f"{name} must be in [-2, 2], got {value}.")
        _check(
            self.repetition_penalty > 0.0,
            f"repetition_penalty must be greater than zero, got {self.repetition_penalty}.",
        )
        _check(
            self.temperature >= 0.0 and math.isfinite(self.temperature),
            f"temperature must be non-negative and finite, got {self.temperature}.",
        )
        _check(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}.")
        _check(
            self.top_k >= 0,
            f"top_k must be 0 or -1 (disable), or at least 1, got {self.top_k}.",
        )
        _check(0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}.")
        if self.max_tokens is not None:
            _check(self.max_tokens >= 1, f"max_tokens must be at least 1, got {self.max_tokens}.")
        _check(self.min_tokens >= 0, f"min_tokens must be at least 0, got {self.min_tokens}.")
        if self.max_tokens is not None:
            _check(
                self.min_tokens <= self.max_tokens,
                f"min_tokens must be less than or equal to max_tokens={self.max_tokens}, "
                f"got {self.min_tokens}.",
            )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                _check(value >= 0, f"{name} must be non-negative, got {value}.")
        if self.seed is not None:
            _check(
                _MIN_SEED <= self.seed <= _MAX_SEED,
                f"seed must be in [{_MIN_SEED}, {_MAX_SEED}], got {self.seed}.",
            )

    def _validate_token_lists(self) -> None:
        assert isinstance(self.stop, list)
        _check(
            all(isinstance(s, str) and s for s in self.stop),
            f"stop must contain only non-empty strings, got {self.stop!r}.",
        )
        _check(
            not self.stop or self.detokenize,
            "stop strings are only supported when detokenize is True.",
        )
        _check(
            all(_is_token_id(t) for t in self.stop_token_ids or []),
            f"stop_token_ids must be non-negative ints, got {self.stop_token_ids!r}.",
        )
        if self.logit_bias is not None:
            _check(
                all(k >= 0 for k in self.logit_bias),
                f"logit_bias keys must be non-negative token ids, got {list(self.logit_bias)}.",
            )
            _check(
                all(math.isfinite(v) for v in self.logit_bias.values()),
                "logit_bias values must be finite numbers (use -100 to ban a token).",
            )
        if self.allowed_token_ids is not None:
            _check(
                len(self.allowed_token_ids) > 0,
                "allowed_token_ids must not be empty: no token could be sampled.",
            )
            _check(
                all(_is_token_id(t) for t in self.allowed_token_ids),
                f"allowed_token_ids must be non-negative ints, got {self.allowed_token_ids!r}.",
            )


def _is_token_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)
