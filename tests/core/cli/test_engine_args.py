"""Engine flags: every EngineConfig option becomes a flag; booleans take --no-*, and an
optional boolean (None = the platform decides) stays None unless given."""

from __future__ import annotations

import argparse

import pytest

from kvplane.cli.engine_args import add_engine_arguments, engine_config_from_args


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize(
    ("argv", "expected"),
    [((), None), (("--async-scheduling",), True), (("--no-async-scheduling",), False)],
)
def test_async_scheduling_flag(argv: tuple[str, ...], expected: bool | None) -> None:
    config = engine_config_from_args(parse(*argv))
    assert config.async_scheduling is expected


def test_enforce_eager_and_numbers() -> None:
    config = engine_config_from_args(parse("--enforce-eager", "--max-num-seqs", "8"))
    assert config.enforce_eager is True and config.max_num_seqs == 8
    assert engine_config_from_args(parse()).enforce_eager is False
