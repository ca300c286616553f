"""``speculative_config``: which proposer drafts tokens, how many, and when to stop.

Spelled as vLLM spells it: ``{"method": "ngram", "num_speculative_tokens": 4,
"prompt_lookup_min": 2, "prompt_lookup_max": 5}`` or ``{"method": "draft_model",
"model": PATH, "num_speculative_tokens": 4}`` (a ``model`` without a ``method`` means
``draft_model``). Parsed and validated by :func:`parse_speculative_config` when the
:class:`~kvplane.config.EngineConfig` is built, so a mistake fails before any weights load.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

#: Proposers kvplane has, by vLLM's method names.
METHODS = ("ngram", "draft_model")

#: vLLM methods kvplane does not have yet (named in the error, not silently ignored).
UNSUPPORTED_METHODS = ("suffix", "eagle", "eagle3", "medusa", "mlp_speculator", "mtp")

#: ``disable_by_batch_size`` when the config names none: at this many running sequences
#: a decode step stops being memory-bound on most devices and drafts cost more than they
#: save (vLLM leaves it off by default; kvplane turns speculation down on its own).
DEFAULT_DISABLE_BY_BATCH_SIZE = 32

#: ``prompt_lookup_min`` / ``prompt_lookup_max`` when neither is given (vLLM's default).
DEFAULT_PROMPT_LOOKUP = 5


@dataclass(frozen=True, slots=True)
class SpeculativeConfig:
    """A validated ``speculative_config`` (see the module docstring).

    ``disable_by_batch_size``: no drafts in a step while at least this many sequences
    run (0: never turned off). ``prompt_lookup_min`` / ``prompt_lookup_max`` bound the
    n-gram the ``ngram`` method matches; ``model`` is the ``draft_model``'s path.
    """

    method: str
    num_speculative_tokens: int
    prompt_lookup_min: int | None = None
    prompt_lookup_max: int | None = None
    model: str | None = None
    disable_by_batch_size: int = DEFAULT_DISABLE_BY_BATCH_SIZE

    def to_dict(self) -> dict[str, Any]:
        """The keys that are set, as a ``speculative_config`` dict again."""
        values = {field.name: getattr(self, field.name) for field in fields(self)}
        return {key: value for key, value in values.items() if value is not None}


_KEYS = tuple(field.name for field in fields(SpeculativeConfig))


def parse_speculative_config(value: Mapping[str, Any]) -> SpeculativeConfig:
    """Validate a ``speculative_config`` dict; ``ValueError`` naming the key at fault."""
    if not isinstance(value, Mapping):
        raise ValueError(
            "speculative_config must be a JSON object such as "
            '{"method": "ngram", "num_speculative_tokens": 4}, got ' + repr(value)
        )
    unknown = sorted(set(value) - set(_KEYS))
    if unknown:
        raise ValueError(
            f"speculative_config has unknown keys {unknown}; kvplane knows {list(_KEYS)}"
        )
    method = value.get("method")
    if method is None:
        if value.get("model") is None:
            raise ValueError(
                f"speculative_config needs a 'method' (one of {list(METHODS)}) or a draft 'model'"
            )
        method = "draft_model"
    if method in UNSUPPORTED_METHODS:
        raise ValueError(
            f"speculative_config method {method!r} is not supported by kvplane yet; "
            f"use one of {list(METHODS)}"
        )
    if method not in METHODS:
        raise ValueError(
            f"speculative_config method must be one of {list(METHODS)}, got {method!r}"
        )
    num_tokens = _int(value, "num_speculative_tokens", required=True, minimum=1)
    assert num_tokens is not None
    disable = _int(value, "disable_by_batch_size", required=False, minimum=0)
    common: dict[str, Any] = {
        "method": method,
        "num_speculative_tokens": num_tokens,
        "disable_by_batch_size": DEFAULT_DISABLE_BY_BATCH_SIZE if disable is None else disable,
    }
    if method == "ngram":
        low, high = _prompt_lookup(value)
        return SpeculativeConfig(**common, prompt_lookup_min=low, prompt_lookup_max=high)
    _only_for(value, ("prompt_lookup_min", "prompt_lookup_max"), "ngram", method)
    model = value.get("model")
    if not isinstance(model, str) or not model:
        raise ValueError(
            "speculative_config method 'draft_model' needs 'model': the path of a smaller "
            f"model with the same tokenizer, got {model!r}"
        )
    return SpeculativeConfig(**common, model=model)


def _prompt_lookup(value: Mapping[str, Any]) -> tuple[int, int]:
    """``(prompt_lookup_min, prompt_lookup_max)``, one defaulting to the other (vLLM)."""
    _only_for(value, ("model",), "draft_model", "ngram")
    low = _int(value, "prompt_lookup_min", required=False, minimum=1)
    high = _int(value, "prompt_lookup_max", required=False, minimum=1)
    if low is None and high is None:
        low = high = DEFAULT_PROMPT_LOOKUP
    elif low is None:
        low = high
    elif high is None:
        high = low
    assert low is not None and high is not None
    if low > high:
        raise ValueError(
            f"speculative_config prompt_lookup_min ({low}) must not exceed "
            f"prompt_lookup_max ({high})"
        )
    return low, high


def _only_for(value: Mapping[str, Any], keys: tuple[str, ...], owner: str, method: str) -> None:
    for key in keys:
        if value.get(key) is not None:
            raise ValueError(
                f"speculative_config key {key!r} belongs to method {owner!r}, not {method!r}"
            )


def _int(value: Mapping[str, Any], key: str, *, required: bool, minimum: int) -> int | None:
    raw = value.get(key)
    if raw is None:
        if required:
            raise ValueError(f"speculative_config needs {key!r} (an int >= {minimum})")
        return None
    if not isinstance(raw, int) or isinstance(raw, bool) or raw < minimum:
        raise ValueError(f"speculative_config {key!r} must be an int >= {minimum}, got {raw!r}")
    return raw
