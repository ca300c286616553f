"""Llama (and its rope scalings) against transformers."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvplane.testing.models import tiny_llama_config

from .harness import check_architecture

ROPE_SCALINGS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 128,
    },
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
}


@pytest.mark.parametrize("rope", sorted(ROPE_SCALINGS))
def test_llama_matches_transformers(rope: str, tmp_path: Path) -> None:
    parameters = {"rope_type": "default", "rope_theta": 10000.0, **(ROPE_SCALINGS[rope] or {})}
    check_architecture(tiny_llama_config(rope_parameters=parameters), tmp_path)


def test_llama_with_attention_bias(tmp_path: Path) -> None:
    check_architecture(tiny_llama_config(attention_bias=True, mlp_bias=True), tmp_path)
