"""A model's recommended sampling: the defaults a request gets for the fields it leaves out.

Mirrors vLLM's ``--generation-config``: ``"auto"`` reads the sampling keys of the model's
``generation_config.json`` (:data:`SAMPLING_KEYS`, vLLM's set; ``do_sample`` is ignored, as
vLLM ignores it), or for a known GGUF file without one, its authors' recommendation (the
embedded SmolLM2: temperature 0.2, top_p 0.9); ``"kvplane"`` (or vLLM's name, ``"vllm"``)
keeps kvplane's own defaults; a path names a ``generation_config.json`` or its directory.
``override_generation_config`` then sets or, with ``None``, removes single keys.

A request's own values always win, field by field: the OpenAI endpoints fill only the
fields a request leaves out, and ``LLM.generate`` applies these defaults only when it is
given no ``SamplingParams`` at all (vLLM's ``LLM.get_default_sampling_params``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvplane.models.source import DEFAULT_MODEL_FILE, DEFAULT_MODEL_NAME, ModelSource
from kvplane.sampling.params import SamplingParams

#: ``generation_config`` value that reads the model's recommended sampling.
GENERATION_CONFIG_AUTO = "auto"
#: ``generation_config`` values that keep kvplane's own defaults (``vllm`` is vLLM's name
#: for the same choice, accepted so a vLLM command line carries over).
ENGINE_DEFAULTS_NAMES = ("kvplane", "vllm")

#: ``generation_config.json`` keys that are sampling defaults, and the
#: :class:`~kvplane.sampling.params.SamplingParams` field each sets (vLLM takes the same).
SAMPLING_KEYS: dict[str, str] = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}
# SamplingParams fields that must be whole numbers (JSON may spell them 20.0).
_INT_FIELDS = frozenset({"top_k", "max_tokens"})

#: The authors' recommended sampling of GGUF files that ship no generation_config.json:
#: file name -> (model name, generation_config.json keys). SmolLM2's model card
#: recommends temperature 0.2 and top_p 0.9; at kvplane's 1.0 the 4-bit 135M model
#: mostly answers nonsense.
_GGUF_RECOMMENDED: dict[str, tuple[str, dict[str, float]]] = {
    DEFAULT_MODEL_FILE: (DEFAULT_MODEL_NAME, {"temperature": 0.2, "top_p": 0.9}),
}


@dataclass(frozen=True, slots=True)
class SamplingDefaults:
    """Sampling defaults of one engine: ``values`` maps SamplingParams field names to the
    value a request gets when it leaves the field out. ``origin`` is for the log: where
    ``values`` came from, or, when it is empty (kvplane's own defaults apply), why."""

    values: Mapping[str, float | int] = field(default_factory=dict)
    origin: str = "none were asked for"

    def get(self, name: str, fallback: Any) -> Any:
        """The default of field ``name``, or ``fallback`` where there is none."""
        return self.values.get(name, fallback)

    def sampling_params(self) -> SamplingParams:
        """A new :class:`SamplingParams` with these defaults, kvplane's for the rest."""
        return SamplingParams(**self.values)  # type: ignore[arg-type]

    def describe(self) -> str:
        """One line for the start-up log: which defaults apply and where they came from."""
        if not self.values:
            return (
                f"sampling defaults: kvplane's own (temperature=1.0, top_p=1.0), as "
                f"{self.origin}; a request's own values win"
            )
        shown = ", ".join(f"{name}={value}" for name, value in self.values.items())
        return (
            f"sampling defaults from {self.origin}: {shown} (a request's own values win; "
            "--generation-config kvplane for kvplane's own)"
        )


def check_generation_config_option(value: str) -> None:
    """``ValueError`` unless ``value`` is ``auto``, ``kvplane``/``vllm``, or a path to a
    ``generation_config.json`` or a directory holding one. Called by ``EngineConfig``."""
    if value != GENERATION_CONFIG_AUTO and value not in ENGINE_DEFAULTS_NAMES:
        generation_config_file(value)


def check_override(override: Mapping[str, Any]) -> None:
    """``ValueError`` for a key of ``override_generation_config`` that is not a sampling key."""
    unknown = sorted(set(override) - set(SAMPLING_KEYS))
    if unknown:
        raise ValueError(
            f"override_generation_config has unknown keys {unknown}; the sampling keys of "
            f"generation_config.json are {sorted(SAMPLING_KEYS)}"
        )


def generation_config_file(path: str | Path) -> Path:
    """The ``generation_config.json`` that ``path`` names (the file, or its directory)."""
    given = Path(path)
    if given.is_dir():
        given = given / "generation_config.json"
        if given.is_file():
            return given
        raise ValueError(f"generation_config: {path} holds no generation_config.json")
    if given.is_file() and given.suffix == ".json":
        return given
    problem = "is not a .json file" if given.exists() else "does not exist"
    raise ValueError(
        f"generation_config must be 'auto', 'kvplane' or the path of a generation_config.json "
        f"or of a directory holding one; {str(path)!r} {problem}"
    )


def resolve_sampling_defaults(
    source: ModelSource,
    generation_config: str = GENERATION_CONFIG_AUTO,
    override: Mapping[str, Any] | None = None,
) -> SamplingDefaults:
    """The sampling defaults for ``source`` under the engine options (see the module
    docstring). Reads at most one small JSON file; ``ValueError`` for a file that is not
    a JSON object or a value SamplingParams rejects."""
    if generation_config in ENGINE_DEFAULTS_NAMES:
        keys: dict[str, Any] = {}
        origin = f"--generation-config {generation_config} asks"
    elif generation_config == GENERATION_CONFIG_AUTO:
        keys, origin = _recommended_by_model(source)
    else:
        path = generation_config_file(generation_config)
        keys = _sampling_keys_of(path)
        origin = str(path) if keys else f"{path} sets no sampling keys"
    if override:
        check_override(override)
        if keys:
            origin += " and --override-generation-config"
        else:
            origin = "--override-generation-config"
        keys.update(override)
    values = {
        SAMPLING_KEYS[key]: _number(key, value, origin)
        for key, value in keys.items()
        if value is not None  # as in vLLM: null leaves the field to kvplane's default
    }
    defaults = SamplingDefaults(values, origin)
    try:
        defaults.sampling_params()
    except ValueError as error:
        raise ValueError(f"sampling defaults from {origin}: {error}") from error
    return defaults


def _recommended_by_model(source: ModelSource) -> tuple[dict[str, Any], str]:
    """The model's recommended sampling keys and where they come from (or why none)."""
    if source.is_gguf:
        if source.gguf_file in _GGUF_RECOMMENDED:
            name, keys = _GGUF_RECOMMENDED[source.gguf_file]
            return dict(keys), f"the authors of {name} (its model card)"
        return {}, "the model recommends none"
    path = source.directory / "generation_config.json"
    if not source.has_files or not path.is_file():
        return {}, "the model recommends none"
    keys = _sampling_keys_of(path)
    if not keys:
        return {}, "the model's generation_config.json sets no sampling keys"
    return keys, "the model's generation_config.json"


def _sampling_keys_of(path: Path) -> dict[str, Any]:
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(content, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return {key: content[key] for key in SAMPLING_KEYS if key in content}


def _number(key: str, value: Any, origin: str) -> float | int:
    name = SAMPLING_KEYS[key]
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if is_number and name in _INT_FIELDS and float(value).is_integer():
        return int(value)
    if is_number and name not in _INT_FIELDS:
        return float(value)
    kind = "a whole number" if name in _INT_FIELDS else "a number"
    raise ValueError(f"sampling defaults from {origin}: {key} must be {kind}, got {value!r}")
