"""Speculative-decoding counters: the ratios, ``/metrics`` series per method, the
engine-process wire, and ``kvplane bench throughput``'s JSON."""

from __future__ import annotations

import dataclasses
import json
import logging
import pickle
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvplane.cli.main import main
from kvplane.engine.loop_stats import LoopStats
from kvplane.scheduler.output import SchedulerStats
from kvplane.server.metrics import ServerMetrics
from kvplane.spec_decode.metrics import SpecDecodeMetrics, SpecDecodeStats
from kvplane.spec_decode.verification import VerifiedDrafts
from kvplane.testing.models import save_random_model, tiny_llama_config


def test_counters_and_ratios() -> None:
    metrics = SpecDecodeMetrics("ngram", 3)
    assert metrics.stats().acceptance_rate == 0.0 and metrics.stats().mean_accepted_length == 0.0
    metrics.record(
        [
            VerifiedDrafts(3, (1, 2, 3), (None, None, None)),
            VerifiedDrafts(3, (), ()),
            VerifiedDrafts(2, (5,), (None,)),
        ]
    )
    stats = metrics.stats()
    assert (stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens) == (3, 8, 4)
    assert stats.num_accepted_tokens_per_pos == (2, 1, 1)
    assert stats.acceptance_rate == 0.5
    assert stats.mean_accepted_length == 1.0 + 4 / 3
    assert stats.as_dict()["spec_decode_acceptance_rate"] == 0.5
    metrics.reset()
    assert metrics.stats() == SpecDecodeStats("ngram", 0, 0, 0, (0, 0, 0))


def test_metrics_endpoint_has_the_series_per_method() -> None:
    spec = SpecDecodeStats("ngram", 10, 40, 30, (10, 9, 7, 4))
    stats = SchedulerStats(1, 0, 0.1, 0, 0, 0, spec_decode=spec)
    assert pickle.loads(pickle.dumps(stats)) == stats  # crosses the engine-process pipe
    text = ServerMetrics("m", lambda: stats).exposition().decode()
    samples = {
        (s.name, s.labels.get("position")): (s.value, s.labels)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    value, labels = samples[("kvplane:spec_decode_acceptance_rate", None)]
    assert value == 0.75 and labels == {"model_name": "m", "method": "ngram"}
    assert samples[("kvplane:spec_decode_mean_accepted_length", None)][0] == 4.0
    assert samples[("kvplane:spec_decode_num_drafts_total", None)][0] == 10
    assert samples[("kvplane:spec_decode_num_draft_tokens_total", None)][0] == 40
    assert samples[("kvplane:spec_decode_num_accepted_tokens_total", None)][0] == 30
    assert samples[("kvplane:spec_decode_num_accepted_tokens_per_pos_total", "3")][0] == 4
    plain = ServerMetrics("m", lambda: SchedulerStats(0, 0, 0.0, 0, 0, 0)).exposition()
    assert b"spec_decode" not in plain  # no speculation, no series


def test_bench_throughput_reports_acceptance(tmp_path: Path) -> None:
    model = tmp_path / "model"
    save_random_model(tiny_llama_config(initializer_range=0.2), model)
    output = tmp_path / "result.json"
    config = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
              "prompt_lookup_max": 2}  # fmt: skip
    status = main(
        ["bench", "throughput", "--model", str(model), "--skip-tokenizer-init", "--device",
         "cpu", "--input-len", "16", "--output-len", "24", "--num-prompts", "4",
         "--temperature", "0", "--speculative-config", json.dumps(config),
         "--output-json", str(output)]
    )  # fmt: skip
    assert status == 0
    result = json.loads(output.read_text())
    assert result["total_output_tokens"] == 4 * 24
    assert result["spec_decode_method"] == "ngram"
    assert result["spec_decode_num_draft_tokens"] > 0
    assert 0.0 <= result["spec_decode_acceptance_rate"] <= 1.0
    assert result["spec_decode_mean_accepted_length"] >= 1.0


def test_the_engine_stats_line_shows_acceptance(caplog: pytest.LogCaptureFixture) -> None:
    from tests.core.engine.test_loop_stats import fake_engine

    engine = fake_engine()
    stats = dataclasses.replace(
        engine.stats(), spec_decode=SpecDecodeStats("ngram", 4, 16, 12, (4, 4, 3, 1))
    )
    engine.stats = lambda: stats
    loop_stats = LoopStats(engine, interval_s=0.0001)
    caplog.set_level(logging.INFO, logger="kvplane.engine.stats")
    loop_stats.count_step()
    time.sleep(0.001)
    loop_stats.maybe_log()
    (line,) = [r.getMessage() for r in caplog.records]
    assert "ngram drafts accepted 75% (mean accepted length 4.00, since start)" in line
