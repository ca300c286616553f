"""Decode graphs: buckets, static-buffer staging and padding, and replay semantics.

A stand-in graph runner "replays" by calling the step function it saw first, so a step
that read anything but the static buffers would return stale results here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from kvplane.attention.metadata import AttentionMetadata
from kvplane.engine.decode_graphs import DecodeGraphs, bucket_sizes
from kvplane.engine.graph_runner import GraphRunner
from kvplane.engine.inputs import HostStepInputs


class ReplayingRunner(GraphRunner):
    """Keeps the first step function per bucket and calls only that one afterwards."""

    def __init__(self, sizes: tuple[int, ...]) -> None:
        self.sizes = set(sizes)
        self.captured: dict[int, Callable[[], Any]] = {}
        self.num_runs = 0

    def can_run(self, batch_size: int) -> bool:
        return batch_size in self.sizes

    def run(self, batch_size: int, step: Callable[[], Any]) -> Any:
        self.num_runs += 1
        return self.captured.setdefault(batch_size, step)()


class EchoModel(torch.nn.Module):
    """Returns, per token, what attention would need: [token, position, slot, seq_len,
    first block id, last block id of the sequence]."""

    def __init__(self, block_size: int) -> None:
        super().__init__()
        self.block_size = block_size
        self.metadata: list[AttentionMetadata] = []

    def forward(
        self, token_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata
    ) -> torch.Tensor:  # [num_seqs, 6]
        self.metadata.append(metadata)
        last_block = (metadata.seq_lens.long() - 1) // self.block_size  # [num_seqs]
        rows = torch.arange(len(token_ids))
        return torch.stack(
            [
                token_ids,
                positions,
                metadata.slot_mapping,
                metadata.seq_lens.long(),
                metadata.block_tables[:, 0].long(),
                metadata.block_tables[rows, last_block].long(),
            ],
            dim=1,
        )


def decode_step(seq_lens: list[int], block_size: int, seed: int) -> HostStepInputs:
    rng = np.random.default_rng(seed)
    num_seqs = len(seq_lens)
    max_blocks = max(-(-n // block_size) for n in seq_lens)
    tables = np.zeros((num_seqs, max_blocks), dtype=np.int32)
    for row, n in enumerate(seq_lens):
        tables[row, : -(-n // block_size)] = rng.choice(1000, -(-n // block_size), replace=False)
    positions = np.asarray(seq_lens, dtype=np.int64) - 1
    slots = (
        tables[np.arange(num_seqs), positions // block_size] * block_size + positions % block_size
    )
    return HostStepInputs(
        token_ids=rng.integers(0, 500, num_seqs).astype(np.int64),
        positions=positions,
        slot_mapping=slots.astype(np.int64),
        query_start_loc=np.arange(num_seqs + 1, dtype=np.int32),
        seq_lens=np.asarray(seq_lens, dtype=np.int32),
        block_tables=tables,
        max_query_len=1,
        logits_indices=np.arange(num_seqs, dtype=np.int64),
        sample_request_ids=tuple(str(i) for i in range(num_seqs)),
        sample_rows=tuple(range(num_seqs)),
        prompt_logprobs=(),
    )


def expected_rows(host: HostStepInputs, block_size: int) -> torch.Tensor:
    last = (host.seq_lens.astype(np.int64) - 1) // block_size
    rows = np.stack(
        [
            host.token_ids,
            host.positions,
            host.slot_mapping,
            host.seq_lens,
            host.block_tables[:, 0],
            host.block_tables[np.arange(host.num_seqs), last],
        ],
        axis=1,
    )
    return torch.as_tensor(rows.astype(np.int64))


def test_bucket_sizes() -> None:
    assert bucket_sizes(1) == (1,)
    assert bucket_sizes(3) == (1, 2, 4)
    assert bucket_sizes(9) == (1, 2, 4, 8, 16)
    sizes = bucket_sizes(256)
    assert sizes[:5] == (1, 2, 4, 8, 16) and sizes[-1] == 256 and len(sizes) == 35
    assert bucket_sizes(10_000)[-1] == 512


def make_graphs(block_size: int = 16, max_num_seqs: int = 16) -> tuple[DecodeGraphs, EchoModel]:
    model = EchoModel(block_size)
    runner = ReplayingRunner(bucket_sizes(max_num_seqs))
    graphs = DecodeGraphs(
        model, runner, torch.device("cpu"), block_size, 512, max_num_seqs, pin_memory=False
    )
    return graphs, model


def test_replayed_steps_see_each_steps_inputs_and_padding() -> None:
    graphs, model = make_graphs()
    graphs.capture()
    assert len(model.metadata) == len(graphs.sizes)
    # Varying batch sizes, lengths and table widths through the same few buckets.
    for seed, seq_lens in enumerate([[5, 40, 17], [300, 2, 33, 16, 1], [7], [512] * 9, [3, 4]]):
        host = decode_step(seq_lens, 16, seed)
        bucket = graphs.bucket_for(host)
        assert bucket is not None and bucket >= len(seq_lens)
        hidden = graphs.run(host, bucket)
        assert torch.equal(hidden, expected_rows(host, 16))
        # Padding rows: nothing written (slot -1), one token, block row 0.
        metadata = graphs._metadata[bucket]
        assert metadata.max_query_len == 1 and metadata.max_seq_len == 512
        assert (metadata.slot_mapping[len(seq_lens) :] == -1).all()
        assert (metadata.seq_lens[len(seq_lens) :] == 1).all()
        assert (metadata.block_tables[len(seq_lens) :, 0] == 0).all()


@pytest.mark.parametrize(
    "change",
    [
        {"max_query_len": 2},
        {"logits_indices": np.arange(2, dtype=np.int64)},
        {"prompt_logprobs": ("x",)},
    ],
)
def test_non_decode_steps_run_eagerly(change: dict[str, Any]) -> None:
    import dataclasses

    graphs, _ = make_graphs()
    host = dataclasses.replace(decode_step([5, 6, 7], 16, 0), **change)
    assert graphs.bucket_for(host) is None


def test_batches_past_the_largest_bucket_run_eagerly() -> None:
    graphs, _ = make_graphs(max_num_seqs=8)
    assert graphs.bucket_for(decode_step([3] * 9, 16, 0)) is None
    assert graphs.bucket_for(decode_step([3] * 8, 16, 0)) == 8
