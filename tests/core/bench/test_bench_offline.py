"""`kvplane bench throughput` and `latency`: JSON fields present and consistent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvplane.bench.datasets import nano_requests, random_requests
from kvplane.bench.results import percentile
from kvplane.cli.main import main
from kvplane.testing.models import save_random_model, tiny_llama_config

THROUGHPUT_FIELDS = (
    "elapsed_time",
    "num_requests",
    "total_num_tokens",
    "total_output_tokens",
    "requests_per_second",
    "tokens_per_second",
    "output_tokens_per_second",
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny")
    save_random_model(tiny_llama_config(max_position_embeddings=1024), directory)
    return directory


def test_nano_workload_has_the_published_totals() -> None:
    requests = nano_requests()
    assert len(requests) == 256
    assert sum(len(r.prompt_token_ids) for r in requests) == 142_827
    assert sum(r.output_len for r in requests) == 133_966


def test_random_workload_is_seeded_and_exact() -> None:
    first = random_requests(5, 12, 7, vocab_size=100, seed=3)
    assert first == random_requests(5, 12, 7, vocab_size=100, seed=3)
    assert first != random_requests(5, 12, 7, vocab_size=100, seed=4)
    assert all(len(r.prompt_token_ids) == 12 and r.output_len == 7 for r in first)
    assert all(0 <= t < 100 for r in first for t in r.prompt_token_ids)


def test_percentile_interpolates() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([5.0], 99) == 5.0
    assert percentile([], 50) == 0.0


def test_throughput_json_counts_and_rates(tiny_dir: Path, tmp_path: Path) -> None:
    output = tmp_path / "throughput.json"
    status = main(
        [
            "bench",
            "throughput",
            "--model",
            str(tiny_dir),
            "--skip-tokenizer-init",
            "--device",
            "cpu",
            "--input-len",
            "40",
            "--output-len",
            "9",
            "--num-prompts",
            "12",
            "--output-json",
            str(output),
            "--baseline",
            "transformers",
            "--baseline-batch-size",
            "4",
        ]
    )
    assert status == 0
    result = json.loads(output.read_text())
    for field in THROUGHPUT_FIELDS:
        assert field in result
    assert result["num_requests"] == 12
    assert result["total_output_tokens"] == 12 * 9  # EOS ignored: exactly what was asked
    assert result["total_num_tokens"] == 12 * (40 + 9)
    elapsed = result["elapsed_time"]
    assert result["requests_per_second"] == pytest.approx(12 / elapsed)
    assert result["output_tokens_per_second"] == pytest.approx(12 * 9 / elapsed)
    assert result["tokens_per_second"] == pytest.approx(12 * 49 / elapsed)
    # Where the host time of a step goes, per phase (ms/step over every step of the run).
    assert result["num_steps"] >= 9
    assert {"step_ms_schedule", "step_ms_prepare", "step_ms_forward"} <= set(result)
    assert all(result[k] >= 0.0 for k in result if k.startswith("step_ms_"))
    baseline = result["baseline"]
    assert baseline["engine"] == "transformers" and baseline["total_output_tokens"] == 12 * 9
    assert result["ratio_vs_baseline"] == pytest.approx(
        result["output_tokens_per_second"] / baseline["output_tokens_per_second"]
    )


def test_latency_json(tiny_dir: Path, tmp_path: Path) -> None:
    output = tmp_path / "latency.json"
    status = main(
        [
            "bench",
            "latency",
            "--model",
            str(tiny_dir),
            "--skip-tokenizer-init",
            "--device",
            "cpu",
            "--batch-size",
            "3",
            "--input-len",
            "10",
            "--output-len",
            "6",
            "--num-iters-warmup",
            "1",
            "--num-iters",
            "3",
            "--output-json",
            str(output),
        ]
    )
    assert status == 0
    result = json.loads(output.read_text())
    assert len(result["latencies"]) == 3
    assert result["avg_latency"] == pytest.approx(sum(result["latencies"]) / 3)
    assert set(result["percentiles"]) == {"10", "25", "50", "75", "90", "99"}
    assert min(result["latencies"]) <= result["percentiles"]["50"] <= max(result["latencies"])


class WordTokenizer:
    """One token per whitespace-separated word: enough to test the dataset's filters."""

    def encode(self, text: str) -> list[int]:
        return [len(word) for word in text.split()]


def test_sharegpt_takes_first_turns_and_reply_lengths(tmp_path: Path) -> None:
    conversations = [
        {
            "conversations": [
                {"from": "human", "value": "tell me a long story please now"},
                {"from": "gpt", "value": "once upon a time there was"},
            ]
        },
        {
            "conversations": [
                {"from": "human", "value": "hi"},  # too short: skipped
                {"from": "gpt", "value": "hello there my friend"},
            ]
        },
        {"conversations": [{"from": "human", "value": "one turn only"}]},  # no reply: skipped
        {
            "conversations": [
                {"from": "human", "value": "what is two plus two"},
                {"from": "gpt", "value": "two plus two is four"},
            ]
        },
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(conversations))
    from kvplane.bench.datasets import sharegpt_requests

    requests = sharegpt_requests(path, 10, WordTokenizer(), seed=0)
    assert sorted((len(r.prompt_token_ids), r.output_len) for r in requests) == [(5, 5), (7, 6)]
    assert len(sharegpt_requests(path, 1, WordTokenizer(), seed=0)) == 1
    with pytest.raises(ValueError, match="tokenizer"):
        sharegpt_requests(path, 1, None, seed=0)


def test_dataset_flag_takes_a_sharegpt_file(tiny_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="takes no file"):
        main(
            [
                "bench",
                "throughput",
                "--model",
                str(tiny_dir),
                "--skip-tokenizer-init",
                "--dataset",
                "random",
                "extra.json",
            ]
        )
