"""Step graphs (decode and mixed): buckets, static-buffer staging and padding, replay.

A stand-in graph runner "replays" by calling the step function it saw first, so a step
that read anything but the static buffers would return stale results here.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from kvplane.attention.metadata import AttentionMetadata
from kvplane.engine.graph_runner import GraphRunner
from kvplane.engine.inputs import HostStepInputs
from kvplane.engine.step_graphs import (
    DecodeGraphs,
    MixedGraphs,
    decode_bucket_sizes,
    mixed_bucket_sizes,
)
from kvplane.engine.transfer import DeviceTransfer

HOST = DeviceTransfer(torch.device("cpu"), pin_memory=False)


class ReplayingRunner(GraphRunner):
    """Keeps the first step function per bucket and calls only that one afterwards."""

    def __init__(self, sizes: tuple[int, ...]) -> None:
        self.sizes = set(sizes)
        self.captured: dict[int, Callable[[], Any]] = {}
        self.num_runs = 0

    def can_run(self, bucket: int) -> bool:
        return bucket in self.sizes

    def run(self, bucket: int, step: Callable[[], Any]) -> Any:
        self.num_runs += 1
        return self.captured.setdefault(bucket, step)()


class EchoModel(torch.nn.Module):
    """Returns, per token, what attention would need: [token, position, slot, and of the
    token's sequence: seq_len, first block id, last block id]."""

    def __init__(self, block_size: int) -> None:
        super().__init__()
        self.block_size = block_size
        self.metadata: list[AttentionMetadata] = []

    def forward(
        self, token_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata
    ) -> torch.Tensor:  # [num_tokens, 6]
        self.metadata.append(metadata)
        token_indices = torch.arange(len(token_ids), dtype=torch.int32)
        seq_of_token = torch.searchsorted(metadata.query_start_loc, token_indices, right=True) - 1
        seq_lens = metadata.seq_lens.long()[seq_of_token]  # [num_tokens]
        last_block = ((seq_lens - 1) // self.block_size).clamp(min=0)
        tables = metadata.block_tables[seq_of_token]  # [num_tokens, max_blocks]
        return torch.stack(
            [
                token_ids,
                positions,
                metadata.slot_mapping,
                seq_lens,
                tables[:, 0].long(),
                tables[torch.arange(len(token_ids)), last_block].long(),
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


def mixed_step(query_lens: list[int], context_lens: list[int], seed: int) -> HostStepInputs:
    """Sequences with ``query_lens`` new tokens after ``context_lens`` cached ones; every
    sequence samples its last token, the first also scores two prompt positions."""
    rng = np.random.default_rng(seed)
    block_size = 16
    seq_lens = np.asarray(query_lens) + np.asarray(context_lens)
    max_blocks = int(max(-(-n // block_size) for n in seq_lens))
    tables = np.zeros((len(query_lens), max_blocks), dtype=np.int32)
    for row, n in enumerate(seq_lens):
        count = -(-int(n) // block_size)
        tables[row, :count] = rng.choice(1000, count, replace=False)
    query_start_loc = np.zeros(len(query_lens) + 1, dtype=np.int32)
    np.cumsum(query_lens, out=query_start_loc[1:])
    positions = np.concatenate(
        [np.arange(c, c + q) for q, c in zip(query_lens, context_lens, strict=True)]
    ).astype(np.int64)
    seq_of_token = np.repeat(np.arange(len(query_lens)), query_lens)
    slots = tables[seq_of_token, positions // block_size] * block_size + positions % block_size
    last_tokens = query_start_loc[1:] - 1
    logits_indices = np.concatenate([[0, 1], last_tokens]).astype(np.int64)
    return HostStepInputs(
        token_ids=rng.integers(0, 500, len(positions)).astype(np.int64),
        positions=positions,
        slot_mapping=slots.astype(np.int64),
        query_start_loc=query_start_loc,
        seq_lens=seq_lens.astype(np.int32),
        block_tables=tables,
        max_query_len=max(query_lens),
        logits_indices=logits_indices,
        sample_request_ids=tuple(str(i) for i in range(len(query_lens))),
        sample_rows=tuple(range(2, 2 + len(query_lens))),
        prompt_logprobs=(),
    )


def expected_rows(host: HostStepInputs, block_size: int) -> torch.Tensor:
    """The echo rows of the step's logit rows (``host.logits_indices``)."""
    tokens = host.logits_indices
    seqs = np.searchsorted(host.query_start_loc, tokens, side="right") - 1
    seq_lens = host.seq_lens[seqs].astype(np.int64)
    rows = np.stack(
        [
            host.token_ids[tokens],
            host.positions[tokens],
            host.slot_mapping[tokens],
            seq_lens,
            host.block_tables[seqs, 0],
            host.block_tables[seqs, (seq_lens - 1) // block_size],
        ],
        axis=1,
    )
    return torch.as_tensor(rows.astype(np.int64))


def test_decode_bucket_sizes() -> None:
    assert decode_bucket_sizes(1) == (1,)
    assert decode_bucket_sizes(3) == (1, 2, 4)
    assert decode_bucket_sizes(9) == (1, 2, 4, 8, 16)
    sizes = decode_bucket_sizes(256)
    assert sizes[:5] == (1, 2, 4, 8, 16) and sizes[-1] == 256 and len(sizes) == 35
    assert decode_bucket_sizes(10_000)[-1] == 512


def make_graphs(block_size: int = 16, max_num_seqs: int = 16) -> tuple[DecodeGraphs, EchoModel]:
    model = EchoModel(block_size)
    sizes = decode_bucket_sizes(max_num_seqs)
    graphs = DecodeGraphs(model, ReplayingRunner(sizes), HOST, block_size, 512, sizes)
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


def test_mixed_bucket_sizes() -> None:
    assert mixed_bucket_sizes(8192, 512) == (16, 32, 48, 64, 96, 128, 192, 256, 320, 384, 448, 512)
    assert mixed_bucket_sizes(40, 512) == (16, 32, 48)
    assert mixed_bucket_sizes(8192, 100) == (16, 32, 48, 64, 96, 128)
    assert mixed_bucket_sizes(8192, 1) == ()  # a one-token step is a decode
    assert mixed_bucket_sizes(8192, 0) == ()
    # Past 512 tokens a bucket is at most a quarter larger than the one below it.
    large = mixed_bucket_sizes(16384, 16384)
    assert large[-1] == 16384 and large[11] == 512
    assert all(b <= 1.25 * a for a, b in itertools.pairwise(large[11:]))
    assert mixed_bucket_sizes(10000, 100_000)[-2:] == (8192, 10240)


def make_mixed_graphs(
    max_tokens: int = 64, max_num_seqs: int | None = None
) -> tuple[MixedGraphs, EchoModel]:
    model = EchoModel(16)
    sizes = mixed_bucket_sizes(8192, max_tokens)
    graphs = MixedGraphs(model, ReplayingRunner(sizes), HOST, 16, 512, sizes, max_num_seqs)
    return graphs, model


@pytest.mark.parametrize("max_num_seqs", [None, 4])
def test_replayed_mixed_steps_see_each_steps_inputs_and_padding(
    max_num_seqs: int | None,
) -> None:
    graphs, model = make_mixed_graphs(max_num_seqs=max_num_seqs)
    graphs.capture()
    assert len(model.metadata) == len(graphs.sizes)
    steps = [
        ([5, 1, 1], [0, 40, 17]),  # a prompt chunk next to two decodes
        ([16], [300]),  # exactly a bucket: the padding sequence has no token
        ([30, 2, 1, 1], [0, 20, 100, 7]),
        ([3, 1], [0, 511]),
    ]
    for seed, (query_lens, context_lens) in enumerate(steps):
        host = mixed_step(query_lens, context_lens, seed)
        bucket = graphs.bucket_for(host)
        assert bucket is not None and bucket >= host.num_tokens
        hidden = graphs.run(host, bucket)
        assert torch.equal(hidden, expected_rows(host, 16))
        metadata = graphs._metadata[bucket]
        num_tokens, num_seqs = host.num_tokens, host.num_seqs
        assert metadata.max_query_len == bucket and metadata.max_seq_len == 512
        bucket_seqs = bucket + 1 if max_num_seqs is None else min(bucket, max_num_seqs) + 1
        assert metadata.num_tokens == bucket and len(metadata.seq_lens) == bucket_seqs
        # Padding tokens: one dummy sequence of its own, nothing written, block row 0.
        assert (metadata.slot_mapping[num_tokens:] == -1).all()
        assert metadata.query_start_loc[num_seqs] == num_tokens
        assert (metadata.query_start_loc[num_seqs + 1 :] == bucket).all()
        assert metadata.seq_lens[num_seqs] == bucket - num_tokens
        assert (metadata.seq_lens[num_seqs + 1 :] == 0).all()
        assert (metadata.block_tables[num_seqs:, 0] == 0).all()


def test_each_family_takes_its_own_steps() -> None:
    mixed, _ = make_mixed_graphs(max_tokens=48)
    decode, _ = make_graphs()
    decode_host = decode_step([5, 6, 7], 16, 0)
    mixed_host = mixed_step([5, 1], [0, 9], 0)
    assert mixed.bucket_for(decode_host) is None and decode.bucket_for(mixed_host) is None
    assert mixed.bucket_for(mixed_host) == 16
    assert mixed.bucket_for(mixed_step([40, 8], [0, 9], 0)) == 48
    assert mixed.bucket_for(mixed_step([41, 8], [0, 9], 0)) is None  # past the largest


def test_mixed_buckets_hold_at_most_max_num_seqs_sequences() -> None:
    """Sequences past ``max_num_seqs`` cannot be scheduled, so a bucket holds that many
    plus the padding one; a step with no room for the padding one runs eagerly."""
    mixed, _ = make_mixed_graphs(max_tokens=64, max_num_seqs=4)
    assert mixed.num_bucket_seqs(64) == 5 and mixed.num_bucket_seqs(16) == 5
    assert mixed.bucket_for(mixed_step([20, 1, 1, 1], [0, 9, 9, 9], 0)) == 32
    assert mixed.bucket_for(mixed_step([20, 1, 1, 1, 1], [0, 9, 9, 9, 9], 0)) is None
