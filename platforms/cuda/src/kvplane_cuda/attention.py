"""Paged attention for CUDA in plain torch: batched decode, SDPA prefill.

This is the interim backend: its semantics are those of
:mod:`kvplane.attention.reference` and it needs nothing but torch. Triton paged-attention
kernels, which read the paged cache in place instead of gathering it, come in a later
issue (in :mod:`kvplane_cuda.kernels`) and will be offered at a higher priority.

How it works, per step (the plan is made once and shared by every layer of the spec):

- sequences with one new token are attended together: their visible context (only the
  window with ``sliding_window``) is gathered from the cache into a padded batch and
  attended in float32 with an explicit masked softmax, chunked to bound the gather;
- each sequence with several new tokens goes through
  ``torch.nn.functional.scaled_dot_product_attention`` in the model dtype (flash
  attention for the common causal case), with a causal mask offset by its cached
  context; with ``logit_softcap`` it takes the explicit float32 path instead.

Host-side lengths (``*_cpu`` in the metadata) drive the plan, so planning never waits
for the GPU; its index tensors are built on the host and copied over once per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvplane.attention.backend import AttentionBackend, AttentionImpl
from kvplane.attention.metadata import AttentionMetadata
from kvplane.plugins.types import AttentionSpec
from kvplane_cuda.ops import reshape_and_cache

#: Upper bound, in elements, of one decode chunk's gathered keys plus values.
DECODE_CHUNK_ELEMENTS = 1 << 27
#: Upper bound, in float32 elements, of one explicit score matrix.
SCORE_CHUNK_ELEMENTS = 1 << 27


class CudaAttentionBackend(AttentionBackend):
    """Serves any head size, block size, GQA ratio, sliding window and softcap."""

    name = "cuda-sdpa"
    priority = 10

    def __init__(self) -> None:
        self._plans: dict[AttentionSpec, _PlanCache] = {}

    def cannot_serve(self, spec: AttentionSpec) -> str | None:
        if spec.num_heads % spec.num_kv_heads != 0:
            return f"num_heads {spec.num_heads} not a multiple of {spec.num_kv_heads}"
        for what, dtype in (("dtype", spec.dtype), ("kv_cache_dtype", spec.kv_cache_dtype)):
            if dtype is not None and not dtype.is_floating_point:
                return f"{what} {dtype} is not a floating-point type"
        return None

    def make_impl(self, spec: AttentionSpec) -> AttentionImpl:
        return CudaAttentionImpl(spec, self._plans.setdefault(spec, _PlanCache()))


@dataclass(frozen=True, slots=True)
class DecodeChunk:
    """Sequences with one new token each, attended together over a padded context."""

    token_ids: torch.Tensor  # [num_seqs] int64 (device), rows of the query
    slots: torch.Tensor  # [num_seqs * kv_len] int64 (device)
    valid: torch.Tensor | None  # [num_seqs, 1, 1, 1, kv_len] bool (device); None: no padding
    num_seqs: int
    kv_len: int


@dataclass(frozen=True, slots=True)
class PrefillSequence:
    """One sequence with several new tokens: query rows ``start:end`` over its keys."""

    start: int
    end: int
    slots: torch.Tensor  # [num_keys] int64 (device)
    mask: torch.Tensor | None  # [query_len, num_keys] bool (device); None: plain causal


@dataclass(frozen=True, slots=True)
class StepPlan:
    decode_chunks: tuple[DecodeChunk, ...]
    prefills: tuple[PrefillSequence, ...]


def plan_step(metadata: AttentionMetadata, spec: AttentionSpec, block_size: int) -> StepPlan:
    """Split a batch into decode chunks and prefill sequences, with slots and masks."""
    device = metadata.block_tables.device
    starts, seq_lens = metadata.query_start_loc_cpu, metadata.seq_lens_cpu
    window = spec.sliding_window
    decode_ids: list[int] = []
    prefills: list[PrefillSequence] = []
    for seq_index, seq_len in enumerate(seq_lens):
        query_len = starts[seq_index + 1] - starts[seq_index]
        if query_len == 1:
            decode_ids.append(seq_index)
            continue
        if query_len == 0:
            continue
        num_cached = seq_len - query_len
        # Keys before the first query's window are never attended: don't gather them.
        first_key = 0 if window is None else max(0, num_cached + 1 - window)
        key_positions = torch.arange(first_key, seq_len, device=device)  # [num_keys]
        table = metadata.block_tables[seq_index].long()
        mask = None
        if num_cached > 0 or (window is not None and window < seq_len):
            query_positions = torch.arange(num_cached, seq_len, device=device).unsqueeze(1)
            mask = key_positions.unsqueeze(0) <= query_positions  # [query_len, num_keys]
            if window is not None:
                mask &= key_positions.unsqueeze(0) > query_positions - window
        start = starts[seq_index]
        prefills.append(
            PrefillSequence(
                start, start + query_len, _slots(table, key_positions, block_size), mask
            )
        )
    visible = {i: seq_lens[i] if window is None else min(seq_lens[i], window) for i in decode_ids}
    per_seq = 2 * spec.num_kv_heads * spec.head_size
    chunks: list[DecodeChunk] = []
    group: list[int] = []
    for seq_id in sorted(decode_ids, key=lambda i: visible[i], reverse=True):
        if group:
            kv_len = visible[group[0]]
            too_big = (len(group) + 1) * kv_len * per_seq > DECODE_CHUNK_ELEMENTS
            if too_big or 2 * visible[seq_id] < kv_len:
                chunks.append(_decode_chunk(metadata, block_size, group, kv_len))
                group = []
        group.append(seq_id)
    if group:
        chunks.append(_decode_chunk(metadata, block_size, group, visible[group[0]]))
    return StepPlan(tuple(chunks), tuple(prefills))


def _decode_chunk(
    metadata: AttentionMetadata, block_size: int, seq_ids: list[int], kv_len: int
) -> DecodeChunk:
    device = metadata.block_tables.device
    lengths = [metadata.seq_lens_cpu[i] for i in seq_ids]
    token_ids = torch.tensor([metadata.query_start_loc_cpu[i] for i in seq_ids])
    seq_lens = torch.tensor(lengths).unsqueeze(1)  # [num_seqs, 1]
    # Each sequence's last ``kv_len`` positions (from 0 if shorter); padding re-reads the
    # last key, so it never touches another sequence's or uninitialised memory.
    positions = (seq_lens - kv_len).clamp(min=0) + torch.arange(kv_len)  # [num_seqs, kv_len]
    valid = positions < seq_lens
    positions = torch.minimum(positions, seq_lens - 1)
    rows = torch.tensor(seq_ids).to(device, non_blocking=True)
    tables = metadata.block_tables.index_select(0, rows).long()
    slots = _slots(tables, positions.to(device, non_blocking=True), block_size)
    is_padded = any(length < kv_len for length in lengths)
    return DecodeChunk(
        token_ids.to(device, non_blocking=True),
        slots.flatten(),
        valid[:, None, None, None, :].to(device, non_blocking=True) if is_padded else None,
        len(seq_ids),
        kv_len,
    )


def _slots(
    block_table: torch.Tensor,  # [..., max_num_blocks] int64
    positions: torch.Tensor,  # [..., num_positions] int64
    block_size: int,
) -> torch.Tensor:  # [..., num_positions] int64
    block_ids = block_table.gather(-1, positions // block_size)
    return block_ids * block_size + positions % block_size


class _PlanCache:
    """The plan of the last step, recognised without reading the GPU.

    The key is the metadata object itself (held, so its ``id`` is not recycled; the
    contract builds a new one per step), its block table's identity and version counter
    where it has one, and the host-side lengths.
    """

    def __init__(self) -> None:
        self._metadata: AttentionMetadata | None = None
        self._key: tuple[object, ...] | None = None
        self._plan: StepPlan | None = None

    def get(self, metadata: AttentionMetadata, spec: AttentionSpec, block_size: int) -> StepPlan:
        tables = metadata.block_tables
        version = None if tables.is_inference() else tables._version
        key = (
            block_size,
            id(tables),
            version,
            metadata.query_start_loc_cpu,
            metadata.seq_lens_cpu,
        )
        if self._plan is None or self._metadata is not metadata or self._key != key:
            self._plan = plan_step(metadata, spec, block_size)
            self._metadata, self._key = metadata, key
        return self._plan


class CudaAttentionImpl(AttentionImpl):
    """One layer: writes its new keys and values, then runs the step plan."""

    def __init__(self, spec: AttentionSpec, plans: _PlanCache) -> None:
        self.spec = spec
        self._plans = plans
        self._group_size = spec.num_heads // spec.num_kv_heads

    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_size]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_size]
        metadata: AttentionMetadata,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_size]
        reshape_and_cache(key, value, kv_cache, metadata.slot_mapping)
        block_size, num_kv_heads, head_size = kv_cache.shape[-3:]
        plan = self._plans.get(metadata, self.spec, block_size)
        flat_cache = kv_cache.view(2, -1, num_kv_heads, head_size)  # [2, num_slots, ...]
        output = torch.empty_like(query)
        for chunk in plan.decode_chunks:
            output.index_copy_(0, chunk.token_ids, self._decode(query, flat_cache, chunk))
        for seq in plan.prefills:
            output[seq.start : seq.end] = self._prefill(query, flat_cache, seq)
        return output

    def _decode(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_size]
        flat_cache: torch.Tensor,  # [2, num_slots, num_kv_heads, head_size]
        chunk: DecodeChunk,
    ) -> torch.Tensor:  # [num_seqs, num_heads, head_size]
        shape = (chunk.num_seqs, chunk.kv_len, *flat_cache.shape[-2:])
        # [B, kv_len, kv_heads, D] -> [B, kv_heads, kv_len, D], float32 like the reference
        keys = flat_cache[0].index_select(0, chunk.slots).view(shape).transpose(1, 2).float()
        values = flat_cache[1].index_select(0, chunk.slots).view(shape).transpose(1, 2).float()
        q = query.index_select(0, chunk.token_ids).float().unsqueeze(2)  # [B, H, 1, D]
        out = self._explicit(q, keys, values, chunk.valid)
        return out.squeeze(2).to(query.dtype)

    def _prefill(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_size]
        flat_cache: torch.Tensor,  # [2, num_slots, num_kv_heads, head_size]
        seq: PrefillSequence,
    ) -> torch.Tensor:  # [query_len, num_heads, head_size]
        q = query[seq.start : seq.end].transpose(0, 1).unsqueeze(0)  # [1, H, Q, D]
        keys = flat_cache[0].index_select(0, seq.slots).transpose(0, 1).unsqueeze(0)
        values = flat_cache[1].index_select(0, seq.slots).transpose(0, 1).unsqueeze(0)
        if self.spec.logit_softcap is not None:
            mask = seq.mask
            if mask is None:
                mask = torch.ones(q.shape[2], keys.shape[2], dtype=torch.bool, device=q.device)
                mask = mask.tril()
            out = self._explicit(q.float(), keys.float(), values.float(), mask)
        else:
            out = F.scaled_dot_product_attention(
                q,
                keys.to(q.dtype),
                values.to(q.dtype),
                attn_mask=seq.mask,
                is_causal=seq.mask is None,
                scale=self.spec.scale,
                enable_gqa=self._group_size > 1,
            )
        return out.squeeze(0).transpose(0, 1).to(query.dtype)

    def _explicit(
        self,
        q: torch.Tensor,  # [B, num_heads, Q, D] float32
        keys: torch.Tensor,  # [B, num_kv_heads, K, D] float32
        values: torch.Tensor,  # [B, num_kv_heads, K, D] float32
        mask: torch.Tensor | None,  # broadcastable to [B, 1, 1, Q, K] bool, True = attend
    ) -> torch.Tensor:  # [B, num_heads, Q, D] float32
        """Masked softmax attention with optional softcap, KV heads never repeated."""
        batch, num_heads, num_queries, head_size = q.shape
        num_kv_heads, num_keys = keys.shape[1], keys.shape[2]
        cap, group = self.spec.logit_softcap, self._group_size
        q = q.reshape(batch, num_kv_heads, group, num_queries, head_size)
        keys_t = keys.transpose(-1, -2)  # [B, kv_heads, D, K]
        step = max(1, SCORE_CHUNK_ELEMENTS // max(1, batch * num_heads * num_keys))
        outputs = []
        for begin in range(0, num_queries, step):
            num = min(step, num_queries - begin)
            rows = q[..., begin : begin + num, :].reshape(batch, num_kv_heads, -1, head_size)
            scores = torch.matmul(rows, keys_t) * self.spec.scale  # [B, kv_heads, G*n, K]
            if cap is not None:
                scores = torch.tanh(scores / cap) * cap
            scores = scores.view(batch, num_kv_heads, group, num, num_keys)
            if mask is not None:
                scores.masked_fill_(~mask[..., begin : begin + num, :], float("-inf"))
            probs = scores.softmax(dim=-1).view(batch, num_kv_heads, -1, num_keys)
            out = torch.matmul(probs, values)  # [B, kv_heads, G*n, D]
            outputs.append(out.view(batch, num_kv_heads, group, num, head_size))
        out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-2)
        return out.reshape(batch, num_heads, num_queries, head_size)
