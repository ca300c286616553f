"""Turning a scheduler output into the flattened, unpadded tensors of one forward pass."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kvplane.attention.metadata import AttentionMetadata
from kvplane.scheduler.output import SchedulerOutput


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
class StepInputs:
    token_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    metadata: AttentionMetadata
    logits_indices: torch.Tensor  # [num_logit_rows] int64, token index of each row
    # request ids sampled this step, and the logits row each samples from
    # (forked children reuse their parent's row).
    sample_request_ids: tuple[str, ...]
    sample_rows: tuple[int, ...]
    prompt_logprobs: tuple[PromptLogprobsSlice, ...]


def prepare_inputs(
    output: SchedulerOutput,
    block_size: int,
    device: torch.device,
    prompt_logprobs_ids: frozenset[str] = frozenset(),
) -> StepInputs:
    """Flatten ``output`` into one batch.

    ``prompt_logprobs_ids`` names the requests that asked for prompt logprobs; their
    prompt positions in this step get logit rows too.
    """
    token_chunks: list[np.ndarray] = []
    position_chunks: list[np.ndarray] = []
    slot_chunks: list[np.ndarray] = []
    query_start_loc = [0]
    seq_lens: list[int] = []
    block_tables: list[list[int]] = []
    logits_indices: list[int] = []
    sample_request_ids: list[str] = []
    sample_rows: list[int] = []
    row_of_parent: dict[str, int] = {}
    prompt_slices: list[PromptLogprobsSlice] = []

    for scheduled in output.scheduled:
        request = scheduled.request
        start, end = scheduled.start_position, scheduled.start_position + scheduled.num_new_tokens
        token_base = query_start_loc[-1]
        positions = np.arange(start, end, dtype=np.int64)
        block_ids = np.asarray(scheduled.block_ids, dtype=np.int64)
        token_chunks.append(np.asarray(request.all_token_ids[start:end], dtype=np.int64))
        position_chunks.append(positions)
        slot_chunks.append(block_ids[positions // block_size] * block_size + positions % block_size)
        query_start_loc.append(token_base + scheduled.num_new_tokens)
        seq_lens.append(end)
        block_tables.append(list(scheduled.block_ids))

        if request.request_id in prompt_logprobs_ids:
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
        if scheduled.is_sampling:
            row_of_parent[request.request_id] = len(logits_indices)
            sample_request_ids.append(request.request_id)
            sample_rows.append(len(logits_indices))
            logits_indices.append(token_base + scheduled.num_new_tokens - 1)

    for forked in output.forked:
        sample_request_ids.append(forked.child.request_id)
        sample_rows.append(row_of_parent[forked.parent_id])

    max_blocks = max((len(table) for table in block_tables), default=0)
    padded_tables = np.zeros((len(block_tables), max(max_blocks, 1)), dtype=np.int32)
    for row, table in enumerate(block_tables):
        padded_tables[row, : len(table)] = table

    def to_device(array: np.ndarray | list[int], dtype: torch.dtype) -> torch.Tensor:
        return torch.as_tensor(np.asarray(array), dtype=dtype).to(device, non_blocking=True)

    metadata = AttentionMetadata(
        slot_mapping=to_device(np.concatenate(slot_chunks), torch.int64),
        query_start_loc=to_device(query_start_loc, torch.int32),
        seq_lens=to_device(seq_lens, torch.int32),
        block_tables=to_device(padded_tables, torch.int32),
        max_query_len=max(s.num_new_tokens for s in output.scheduled),
        max_seq_len=max(seq_lens),
        query_start_loc_cpu=tuple(query_start_loc),
        seq_lens_cpu=tuple(seq_lens),
    )
    return StepInputs(
        token_ids=to_device(np.concatenate(token_chunks), torch.int64),
        positions=to_device(np.concatenate(position_chunks), torch.int64),
        metadata=metadata,
        logits_indices=to_device(logits_indices, torch.int64),
        sample_request_ids=tuple(sample_request_ids),
        sample_rows=tuple(sample_rows),
        prompt_logprobs=tuple(prompt_slices),
    )
