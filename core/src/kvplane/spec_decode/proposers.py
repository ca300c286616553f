"""Builds the engine's :class:`SpecDecoder` from ``speculative_config``: one proposer per
method."""

from __future__ import annotations

from kvplane.config import EngineConfig
from kvplane.models.config import ModelConfig
from kvplane.models.layers.context import BuildContext
from kvplane.spec_decode.base import Proposer
from kvplane.spec_decode.config import SpeculativeConfig
from kvplane.spec_decode.decoder import SpecDecoder
from kvplane.spec_decode.ngram import NgramProposer


def build_spec_decoder(
    config: EngineConfig, model_config: ModelConfig, ctx: BuildContext
) -> SpecDecoder | None:
    """The engine's speculative decoding, or None when ``speculative_config`` is unset.
    A draft model is loaded here, on the target's platform and device."""
    spec_config = config.resolved_speculative_config()
    if spec_config is None:
        return None
    proposer = make_proposer(spec_config, config, model_config, ctx)
    return SpecDecoder(spec_config, proposer, model_config.max_model_len)


def make_proposer(
    spec_config: SpeculativeConfig,
    config: EngineConfig,
    model_config: ModelConfig,
    ctx: BuildContext,
) -> Proposer:
    if spec_config.method == "ngram":
        assert spec_config.prompt_lookup_min is not None
        assert spec_config.prompt_lookup_max is not None
        return NgramProposer(
            spec_config.num_speculative_tokens,
            spec_config.prompt_lookup_min,
            spec_config.prompt_lookup_max,
        )
    from kvplane.spec_decode.draft_model import DraftModelProposer

    return DraftModelProposer.load(spec_config, config, model_config, ctx)
