"""From an API request's fields to the engine's :class:`SamplingParams`.

Everything a client can get wrong raises :class:`~kvplane.server.errors.APIError` 400
naming the parameter (token ids against the vocabulary: :func:`check_token_ids`); what
only the engine can check (a schema that does not compile) fails at admission and is
mapped to 400 by the caller.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any, cast

from kvplane.models.generation_config import SamplingDefaults
from kvplane.sampling.params import RequestOutputKind, SamplingParams
from kvplane.server.errors import APIError, bad_request
from kvplane.server.protocol import _SamplingFields
from kvplane.structured import StructuredOutputParams

_PARAM_NAMES = frozenset(field.name for field in dataclasses.fields(SamplingParams))

# vLLM's ``structured_outputs`` keys -> StructuredOutputParams fields.
_STRUCTURED_KEYS = {
    "json": "json_schema",
    "json_schema": "json_schema",
    "json_object": "json_object",
    "regex": "regex",
    "grammar": "grammar",
    "structural_tag": "structural_tag",
}


def build_sampling_params(
    request: _SamplingFields,
    *,
    max_tokens: int | None,
    logprobs: int | None,
    max_logprobs: int,
    max_num_seqs: int,
    prompt_logprobs: int | None = None,
    structured_output: StructuredOutputParams | None = None,
    detokenize: bool = True,
    defaults: SamplingDefaults | None = None,
) -> SamplingParams:
    """The engine parameters of ``request`` (``max_tokens`` and ``logprobs`` already
    resolved by the endpoint, as the two APIs spell them differently). ``detokenize``
    is False for a model without a tokenizer (text stays empty).

    ``defaults`` (the model's recommended sampling, see ``--generation-config``) fill the
    fields the request leaves out (``None``), one by one; the request's own values win.
    """
    defaults = defaults or SamplingDefaults()

    def pick(name: str, given: Any, fallback: Any) -> Any:
        return defaults.get(name, fallback) if given is None else given

    if request.n > max_num_seqs:
        raise bad_request(
            f"n={request.n} is more than this server runs at once (max_num_seqs={max_num_seqs})",
            "n",
        )
    for name, value in (("logprobs", logprobs), ("prompt_logprobs", prompt_logprobs)):
        if value is not None and value > max_logprobs:
            raise bad_request(f"{name}={value} is more than the maximum of {max_logprobs}", name)
    if structured_output is None:
        structured_output = structured_output_of(request)
    try:
        return SamplingParams(
            n=request.n,
            temperature=pick("temperature", request.temperature, 1.0),
            top_p=pick("top_p", request.top_p, 1.0),
            top_k=pick("top_k", request.top_k, 0),
            min_p=pick("min_p", request.min_p, 0.0),
            repetition_penalty=pick("repetition_penalty", request.repetition_penalty, 1.0),
            presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty,
            seed=request.seed,
            stop=request.stop,
            stop_token_ids=request.stop_token_ids,
            ignore_eos=request.ignore_eos,
            max_tokens=pick("max_tokens", max_tokens, None),
            min_tokens=request.min_tokens,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            include_stop_str_in_output=request.include_stop_str_in_output,
            skip_special_tokens=request.skip_special_tokens,
            spaces_between_special_tokens=request.spaces_between_special_tokens,
            # JSON's string keys: SamplingParams converts them to ints (and rejects others).
            logit_bias=(
                cast(dict[int, float], dict(request.logit_bias)) if request.logit_bias else None
            ),
            allowed_token_ids=request.allowed_token_ids,
            structured_output=structured_output,
            detokenize=detokenize,
            # A stream sends what is new (a step costs what it adds, not the output's
            # length); a response sent whole needs the engine's last output only.
            output_kind=(
                RequestOutputKind.DELTA if request.stream else RequestOutputKind.FINAL_ONLY
            ),
        )
    except ValueError as error:
        raise _param_error(str(error)) from error


def check_token_ids(prompts: list[list[int]], params: SamplingParams, vocab_size: int) -> None:
    """400 naming the field for a token id outside ``[0, vocab_size)``, in a prompt or in
    ``params`` (the engine checks again on admission, without naming the API's field)."""
    for param, token_ids in (
        *(("prompt", prompt) for prompt in prompts),
        ("stop_token_ids", params.stop_token_ids or []),
        ("allowed_token_ids", params.allowed_token_ids or []),
        ("logit_bias", list(params.logit_bias or {})),
    ):
        outside = [token for token in token_ids if not 0 <= token < vocab_size]
        if outside:
            raise bad_request(
                f"{param}: token ids {outside[:5]} are outside the vocabulary [0, {vocab_size})",
                param,
            )


def structured_output_of(request: _SamplingFields) -> StructuredOutputParams | None:
    """The constraint of ``response_format`` or vLLM's ``structured_outputs``, if any."""
    found = []
    if request.response_format is not None:
        try:
            params = StructuredOutputParams.from_response_format(
                request.response_format.model_dump(by_alias=True, exclude_none=True)
            )
        except ValueError as error:
            raise bad_request(str(error), "response_format") from error
        if params is not None:
            found.append(params)
    if request.structured_outputs is not None:
        fields = request.structured_outputs.model_dump(by_alias=True, exclude_none=True)
        if fields:
            found.append(_from_vllm_fields(fields))
    if len(found) > 1:
        raise bad_request(
            "give either response_format or structured_outputs, not both", "structured_outputs"
        )
    return found[0] if found else None


def _from_vllm_fields(fields: Mapping[str, Any]) -> StructuredOutputParams:
    values: dict[str, Any] = {}
    for key, value in fields.items():
        if value is None or value is False:
            continue
        if key == "choice":
            if not isinstance(value, list) or not value:
                raise bad_request("structured_outputs.choice must be a non-empty list", key)
            values["regex"] = "|".join(re.escape(str(choice)) for choice in value)
        elif key in _STRUCTURED_KEYS:
            values[_STRUCTURED_KEYS[key]] = value
        else:
            raise bad_request(
                f"unknown structured_outputs key {key!r}; use one of "
                f"{sorted([*_STRUCTURED_KEYS, 'choice'])}",
                "structured_outputs",
            )
    try:
        return StructuredOutputParams(**values)
    except (TypeError, ValueError) as error:
        raise bad_request(str(error), "structured_outputs") from error


def _param_error(message: str) -> APIError:
    """A 400 for a SamplingParams error; its messages start with the field's name."""
    first_word = message.split(" ", 1)[0]
    return bad_request(message, first_word if first_word in _PARAM_NAMES else None)
