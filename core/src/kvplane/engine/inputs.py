"""Turning a scheduler output into the flattened, unpadded tensors of one forward pass.

Done in two stages so the graph path can reuse the first: :func:`build_host_inputs` makes
host arrays (no device work), :func:`to_device_inputs` copies them into fresh device
tensors for an eager step. The step graphs copy the same host arrays into their static
buffers instead (:mod:`kvplane.engine.step_graphs`). Both copy through a
:class:`~kvplane.engine.transfer.DeviceTransfer`. :class:`PlaceholderFixup` fills
input tokens that are still on the device (overlapped steps).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from kvplane.attention.metadata import AttentionMetadata
from kvplane.engine.transfer import DeviceTransfer
from kvplane.scheduler.output import ScheduledRequest, SchedulerOutput


@dataclass(frozen=True, slots=True)
class PromptLogprobsSlice:
    """Prompt positions of one request whose next-token logprobs this step computes.

    Logit rows ``logit_rows`` (into the step's logits) score ``target_token_ids``, the
    prompt tokens at positions ``first_target_position ...``.
    """

    request_id: str
    logit_rows: tuple[int, ...]
    target_token_ids: tuple[int, ...]
    first_target_position: int


@dataclass(frozen=True, slots=True)
class HostStepInputs:
    """One step's batch as host arrays (``num_seqs`` sequences, ``num_tokens`` tokens)."""

    token_ids: np.ndarray  # [num_tokens] int64
    positions: np.ndarray  # [num_tokens] int64
    slot_mapping: np.ndarray  # [num_tokens] int64
    query_start_loc: np.ndarray  # [num_seqs + 1] int32
    seq_lens: np.ndarray  # [num_seqs] int32
    block_tables: np.ndarray  # [num_seqs, max_num_blocks] int32, zero padded
    max_query_len: int
    logits_indices: np.ndarray  # [num_logit_rows] int64, token index of each row
    # request ids sampled this step, and the logits row each samples from
    # (forked children reuse their parent's row). A request with draft tokens has
    # 1 + len(drafts) consecutive entries: its last known token's row, then each draft's.
    sample_request_ids: tuple[str, ...]
    sample_rows: tuple[int, ...]
    prompt_logprobs: tuple[PromptLogprobsSlice, ...]
    # The draft tokens (speculative decoding) of the requests that have some.
    draft_token_ids: Mapping[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def is_pure_decode(self) -> bool:
        """One new token per sequence, each the sequence's last (its logits row = its index)."""
        return (
            self.max_query_len == 1
            and not self.prompt_logprobs
            and len(self.logits_indices) == self.num_tokens
        )


@dataclass(frozen=True, slots=True)
class StepInputs:
    """An eager step's inputs on the device."""

    token_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    metadata: AttentionMetadata
    logits_indices: torch.Tensor  # [num_logit_rows] int64, token index of each row


def _block_tables(output: SchedulerOutput) -> np.ndarray:
    """``[num_seqs, max(max_blocks, 1)]`` int32: each scheduled request's block table,
    zero-padded, gathered from the scheduler's table array."""
    scheduled = output.scheduled
    num_cols = max(max((s.num_blocks for s in scheduled), default=1), 1)
    rows = np.fromiter((s.block_table_row for s in scheduled), np.intp, len(scheduled))
    return output.block_table[rows, :num_cols]


def _slot_mapping(
    block_tables: np.ndarray,  # [num_seqs, max_blocks] int32
    query_lens: np.ndarray,  # [num_seqs]
    positions: np.ndarray,  # [num_tokens] int64
    block_size: int,
) -> np.ndarray:  # [num_tokens] int64
    """Each token's cache slot: its sequence's block at ``position // block_size``."""
    seq_of_token = np.repeat(np.arange(len(query_lens)), query_lens)  # [num_tokens]
    blocks = block_tables[seq_of_token, positions // block_size].astype(np.int64)
    return blocks * block_size + positions % block_size


def build_host_inputs(
    output: SchedulerOutput,
    block_size: int,
    prompt_logprobs_ids: frozenset[str] = frozenset(),
) -> HostStepInputs:
    """Flatten ``output`` into host arrays.

    ``prompt_logprobs_ids`` names the requests that asked for prompt logprobs; their
    prompt positions in this step get logit rows too.
    """
    scheduled = output.scheduled
    num_seqs = len(scheduled)
    query_lens = np.fromiter((s.num_new_tokens for s in scheduled), np.int32, num_seqs)
    starts = np.fromiter((s.start_position for s in scheduled), np.int64, num_seqs)
    query_start_loc = np.zeros(num_seqs + 1, dtype=np.int32)
    np.cumsum(query_lens, out=query_start_loc[1:])
    seq_lens = (starts + query_lens).astype(np.int32)

    block_tables = _block_tables(output)  # [num_seqs, max_blocks]

    max_query_len = int(query_lens.max()) if num_seqs else 0
    if max_query_len == 1:
        # Decode-heavy steps: one token per sequence, no per-request arrays.
        positions = starts
        token_ids = np.fromiter(
            (s.request.all_token_ids[s.start_position] for s in scheduled), np.int64, num_seqs
        )
    else:
        positions = np.concatenate(
            [np.arange(s.start_position, s.start_position + s.num_new_tokens) for s in scheduled]
        ).astype(np.int64)
        token_ids = np.concatenate([_input_token_ids(s) for s in scheduled])
    slot_mapping = _slot_mapping(block_tables, query_lens, positions, block_size)

    logits_indices: list[int] = []
    sample_request_ids: list[str] = []
    sample_rows: list[int] = []
    row_of_parent: dict[str, int] = {}
    prompt_slices: list[PromptLogprobsSlice] = []
    draft_token_ids: dict[str, tuple[int, ...]] = {}
    for index, item in enumerate(scheduled):
        request = item.request
        start, end = item.start_position, item.start_position + item.num_new_tokens
        token_base = int(query_start_loc[index])
        if prompt_logprobs_ids and request.request_id in prompt_logprobs_ids:
            last_target = min(end, request.num_prompt_tokens - 1)
            if start < last_target:
                first_row = len(logits_indices)
                logits_indices.extend(token_base + p - start for p in range(start, last_target))
                prompt_slices.append(
                    PromptLogprobsSlice(
                        request.request_id,
                        tuple(range(first_row, len(logits_indices))),
                        tuple(request.prompt_token_ids[start + 1 : last_target + 1]),
                        start + 1,
                    )
                )
        if item.is_sampling:
            row_of_parent[request.request_id] = len(logits_indices)
            num_drafts = len(item.spec_token_ids)
            if num_drafts:
                draft_token_ids[request.request_id] = item.spec_token_ids
            for token_index in range(item.num_new_tokens - 1 - num_drafts, item.num_new_tokens):
                sample_request_ids.append(request.request_id)
                sample_rows.append(len(logits_indices))
                logits_indices.append(token_base + token_index)

    for forked in output.forked:
        sample_request_ids.append(forked.child.request_id)
        sample_rows.append(row_of_parent[forked.parent_id])

    return HostStepInputs(
        token_ids=token_ids,
        positions=positions,
        slot_mapping=slot_mapping,
        query_start_loc=query_start_loc,
        seq_lens=seq_lens,
        block_tables=block_tables,
        max_query_len=max_query_len,
        logits_indices=np.asarray(logits_indices, dtype=np.int64),
        sample_request_ids=tuple(sample_request_ids),
        sample_rows=tuple(sample_rows),
        prompt_logprobs=tuple(prompt_slices),
        draft_token_ids=draft_token_ids,
    )


def _input_token_ids(scheduled: ScheduledRequest) -> np.ndarray:  # [num_new_tokens] int64
    """The request's tokens from ``start_position`` on, then its draft tokens."""
    start, num_new = scheduled.start_position, scheduled.num_new_tokens
    num_known = num_new - len(scheduled.spec_token_ids)
    known = scheduled.request.all_token_ids[start : start + num_known]
    if scheduled.spec_token_ids:
        return np.asarray([*known, *scheduled.spec_token_ids], dtype=np.int64)
    return np.asarray(known, dtype=np.int64)


def largest_step_inputs(
    num_tokens: int, max_seq_len: int, block_size: int, num_sampled_rows: int
) -> HostStepInputs:
    """A prefill of ``num_tokens`` tokens (token id 0) in sequences of at most
    ``max_seq_len``, each in blocks of its own numbered from 0, whose last
    ``min(num_sampled_rows, num_tokens)`` tokens are sampled: the step a memory profile
    runs, as large as any the scheduler can make."""
    num_full, rest = divmod(num_tokens, max_seq_len)
    lengths = np.array([max_seq_len] * num_full + ([rest] if rest else []), dtype=np.int32)
    blocks_per_seq = -(-lengths // block_size)  # [num_seqs]
    first_blocks = np.concatenate([[0], np.cumsum(blocks_per_seq)[:-1]])  # [num_seqs]
    columns = np.arange(int(blocks_per_seq.max()))  # [max_blocks]
    block_tables = np.where(
        columns < blocks_per_seq[:, None], first_blocks[:, None] + columns, 0
    ).astype(np.int32)  # [num_seqs, max_blocks]
    query_start_loc = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    positions = np.concatenate([np.arange(n, dtype=np.int64) for n in lengths])
    slot_mapping = _slot_mapping(block_tables, lengths, positions, block_size)
    num_rows = min(num_sampled_rows, num_tokens)
    return HostStepInputs(
        token_ids=np.zeros(num_tokens, dtype=np.int64),
        positions=positions,
        slot_mapping=slot_mapping,
        query_start_loc=query_start_loc,
        seq_lens=lengths,
        block_tables=block_tables,
        max_query_len=int(lengths.max()),
        logits_indices=np.arange(num_tokens - num_rows, num_tokens, dtype=np.int64),
        sample_request_ids=tuple(f"profile-{row}" for row in range(num_rows)),
        sample_rows=tuple(range(num_rows)),
        prompt_logprobs=(),
    )


@dataclass(frozen=True, slots=True)
class PlaceholderFixup:
    """Input tokens whose ids are still on the device, in the previous step's samples."""

    source_rows: torch.Tensor  # [num_tokens] int64: row in ``sampled``, or -1 (keep)
    sampled: torch.Tensor  # [num_previous_rows] int64, the previous step's tokens

    def apply(self, token_ids: torch.Tensor) -> None:  # [num_tokens] int64, in place
        rows = self.source_rows
        taken = self.sampled.index_select(0, rows.clamp(min=0))
        token_ids.copy_(torch.where(rows >= 0, taken, token_ids))


def to_device_inputs(host: HostStepInputs, transfer: DeviceTransfer) -> StepInputs:
    """Copy ``host`` into fresh tensors on ``transfer.device`` (the eager path)."""
    to_device = transfer.to_device
    seq_lens = host.seq_lens.tolist()
    metadata = AttentionMetadata(
        slot_mapping=to_device(host.slot_mapping, torch.int64),
        query_start_loc=to_device(host.query_start_loc, torch.int32),
        seq_lens=to_device(host.seq_lens, torch.int32),
        block_tables=to_device(host.block_tables, torch.int32),
        max_query_len=host.max_query_len,
        max_seq_len=max(seq_lens, default=0),
        query_start_loc_cpu=tuple(host.query_start_loc.tolist()),
        seq_lens_cpu=tuple(seq_lens),
    )
    return StepInputs(
        token_ids=to_device(host.token_ids, torch.int64),
        positions=to_device(host.positions, torch.int64),
        metadata=metadata,
        logits_indices=to_device(host.logits_indices, torch.int64),
    )
