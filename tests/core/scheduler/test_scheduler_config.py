"""SchedulerConfig validation."""

from __future__ import annotations

import pytest

from kvplane.scheduler import SchedulerConfig


def test_defaults() -> None:
    config = SchedulerConfig(max_model_len=2048)
    assert (config.max_num_seqs, config.max_num_batched_tokens) == (256, 8192)
    assert config.enable_prefix_caching and config.block_size == 16


@pytest.mark.parametrize(
    "field", ["max_num_seqs", "max_num_batched_tokens", "max_model_len", "block_size"]
)
@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_rejects_non_positive_ints(field: str, value: object) -> None:
    kwargs: dict[str, object] = {"max_model_len": 128, field: value}
    with pytest.raises(ValueError, match=field):
        SchedulerConfig(**kwargs)  # type: ignore[arg-type]


def test_keyword_only() -> None:
    with pytest.raises(TypeError):
        SchedulerConfig(256, 8192, 2048)  # type: ignore[misc]
