"""Paged attention for the CPU: batched decode, SDPA prefill, one plan per step.

Semantics are those of :mod:`kvplane.attention.reference` (the conformance kit compares
them); the speed comes from three things:

- **one plan per step**: the cache slots each sequence reads, and the masks, are
  computed once per :class:`AttentionMetadata` and shared by every layer of the spec;
- **batched decode**: sequences with one new token are attended together over their
  gathered, padded context (sorted by length and chunked so that padding and the
  gathered copy stay small); with a sliding window only the window is gathered;
- **SDPA prefill**: each sequence with several new tokens goes through
  ``torch.nn.functional.scaled_dot_product_attention`` (grouped-query heads without
  repeating them), with a causal mask offset by its cached context.

``logit_softcap`` cannot be expressed through SDPA, so it takes an explicit masked
softmax (queries chunked to bound the score matrix). Everything computes in float32,
like the reference, and returns the query dtype; an FP8 cache's gathered keys and values
are dequantized (``stored * scale``) as they are converted to float32. Padded positions
read a valid slot of their own sequence, so uninitialised cache memory (``torch.empty``)
never leaks in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvplane.attention.backend import AttentionBackend, AttentionImpl
from kvplane.attention.metadata import AttentionMetadata
from kvplane.ops import steps
from kvplane.plugins.types import AttentionSpec
from kvplane_cpu.ops import reshape_and_cache

#: Upper bound, in float32 elements, of one decode chunk's gathered keys plus values.
DECODE_CHUNK_ELEMENTS = 1 << 24
#: Upper bound, in float32 elements, of one explicit (softcap) score matrix.
SCORE_CHUNK_ELEMENTS = 1 << 24


class CpuAttentionBackend(AttentionBackend):
    """Serves any head size, block size, GQA ratio, sliding window and softcap, and a
    float or FP8 (float8_e4m3fn) cache."""

    name = "cpu-sdpa"
    priority = 10
    supports_fp8_kv_cache = True

    def __init__(self) -> None:
        # Shared by every layer of a spec, so a step is planned once per spec.
        self._plans: dict[AttentionSpec, _PlanCache] = {}

    def cannot_serve(self, spec: AttentionSpec) -> str | None:
        if (reason := super().cannot_serve(spec)) is not None:
            return reason
        for what, dtype in (("dtype", spec.dtype), ("kv_cache_dtype", spec.kv_cache_dtype)):
            if dtype is not None and not dtype.is_floating_point:
                return f"{what} {dtype} is not a floating-point type"
        return None

    def make_impl(self, spec: AttentionSpec) -> AttentionImpl:
        return CpuAttentionImpl(spec, self._plans.setdefault(spec, _PlanCache()))


# --------------------------------------------------------------------------------------
# The per-step plan
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DecodeChunk:
    """Sequences with one new token each, attended together over a padded context."""

    token_ids: torch.Tensor  # [num_seqs] int64, rows of the query
    slots: torch.Tensor  # [num_seqs * kv_len] int64, cache slot per (seq, position)
    valid: torch.Tensor | None  # [num_seqs, 1, 1, kv_len] bool; None: no padding
    num_seqs: int
    kv_len: int


@dataclass(frozen=True, slots=True)
class PrefillSequence:
    """One sequence with several new tokens: query rows ``start:end`` over its keys."""

    start: int
    end: int
    slots: torch.Tensor  # [num_keys] int64, cache slots of the keys it may attend to
    mask: torch.Tensor | None  # [query_len, num_keys] bool; None: plain causal, no offset


@dataclass(frozen=True, slots=True)
class StepPlan:
    decode_chunks: tuple[DecodeChunk, ...]
    prefills: tuple[PrefillSequence, ...]


def plan_step(metadata: AttentionMetadata, spec: AttentionSpec, block_size: int) -> StepPlan:
    """Split a batch into decode chunks and prefill sequences, with slots and masks."""
    starts, seq_lens = metadata.query_start_loc_cpu, metadata.seq_lens_cpu
    decode_ids: list[int] = []
    prefills: list[PrefillSequence] = []
    for seq_index, seq_len in enumerate(seq_lens):
        query_len = starts[seq_index + 1] - starts[seq_index]
        if query_len == 1:
            decode_ids.append(seq_index)
        elif query_len > 1:
            prefills.append(
                _plan_prefill(metadata, spec, block_size, seq_index, seq_len, query_len)
            )
    chunks = _plan_decode_chunks(metadata, spec, block_size, decode_ids)
    return StepPlan(tuple(chunks), tuple(prefills))


def _plan_prefill(
    metadata: AttentionMetadata,
    spec: AttentionSpec,
    block_size: int,
    seq_index: int,
    seq_len: int,
    query_len: int,
) -> PrefillSequence:
    start = metadata.query_start_loc_cpu[seq_index]
    num_cached = seq_len - query_len
    # Keys before the first query's window are never attended: don't gather them.
    first_key = 0 if spec.sliding_window is None else max(0, num_cached + 1 - spec.sliding_window)
    key_positions = torch.arange(first_key, seq_len)  # [num_keys]
    slots = _slots(metadata.block_tables[seq_index].long(), key_positions, block_size)
    mask = None
    needs_window = spec.sliding_window is not None and spec.sliding_window < seq_len
    if num_cached > 0 or needs_window:
        query_positions = torch.arange(num_cached, seq_len).unsqueeze(1)  # [query_len, 1]
        mask = key_positions.unsqueeze(0) <= query_positions  # [query_len, num_keys]
        if spec.sliding_window is not None:
            mask &= key_positions.unsqueeze(0) > query_positions - spec.sliding_window
    return PrefillSequence(start, start + query_len, slots, mask)


def _plan_decode_chunks(
    metadata: AttentionMetadata, spec: AttentionSpec, block_size: int, seq_ids: list[int]
) -> list[DecodeChunk]:
    """Group decode sequences by length (longest first) into bounded padded chunks."""
    window = spec.sliding_window
    lengths = {i: metadata.seq_lens_cpu[i] for i in seq_ids}
    # Only the last ``window`` keys of a decode query are visible.
    visible = {i: n if window is None else min(n, window) for i, n in lengths.items()}
    elements_per_position = 2 * spec.num_kv_heads * spec.head_size
    chunks: list[DecodeChunk] = []
    group: list[int] = []
    for seq_id in sorted(seq_ids, key=lambda i: visible[i], reverse=True):
        if group:
            kv_len = visible[group[0]]
            too_big = (len(group) + 1) * kv_len * elements_per_position > DECODE_CHUNK_ELEMENTS
            if too_big or 2 * visible[seq_id] < kv_len:
                chunks.append(_decode_chunk(metadata, block_size, group, lengths, kv_len))
                group = []
        group.append(seq_id)
    if group:
        chunks.append(_decode_chunk(metadata, block_size, group, lengths, visible[group[0]]))
    return chunks


def _decode_chunk(
    metadata: AttentionMetadata,
    block_size: int,
    seq_ids: list[int],
    lengths: dict[int, int],
    kv_len: int,
) -> DecodeChunk:
    token_ids = torch.tensor([metadata.query_start_loc_cpu[i] for i in seq_ids])
    seq_lens = torch.tensor([lengths[i] for i in seq_ids]).unsqueeze(1)  # [num_seqs, 1]
    # The window of each sequence: its last ``kv_len`` positions, from 0 if shorter.
    first = (seq_lens - kv_len).clamp(min=0)
    positions = first + torch.arange(kv_len)  # [num_seqs, kv_len]
    valid = positions < seq_lens
    # Padding re-reads the sequence's last key, so it never touches foreign memory.
    positions = torch.minimum(positions, seq_lens - 1)
    block_tables = metadata.block_tables.index_select(0, torch.tensor(seq_ids)).long()
    slots = _slots(block_tables, positions, block_size)
    is_padded = any(lengths[i] < kv_len for i in seq_ids)
    return DecodeChunk(
        token_ids,
        slots.flatten(),
        valid[:, None, None, :] if is_padded else None,
        len(seq_ids),
        kv_len,
    )


def _slots(
    block_table: torch.Tensor,  # [..., max_num_blocks] int64
    positions: torch.Tensor,  # [..., num_positions] int64
    block_size: int,
) -> torch.Tensor:  # [..., num_positions] int64
    """Cache slot of each token position through the block table."""
    block_ids = block_table.gather(-1, positions // block_size)
    return block_ids * block_size + positions % block_size


class _PlanCache:
    """The plan of the last step, reused while the batch it was made for is unchanged.

    "Unchanged" is checked by content, not identity: the host-side lengths and a copy of
    the block table (a few kilobytes, compared in microseconds), so a runner that reuses
    its metadata or rewrites a persistent block table in place is still planned afresh.
    """

    def __init__(self) -> None:
        self._key: tuple[object, ...] | None = None
        self._block_tables: torch.Tensor | None = None
        self._plan: StepPlan | None = None

    def get(self, metadata: AttentionMetadata, spec: AttentionSpec, block_size: int) -> StepPlan:
        key = (block_size, metadata.query_start_loc_cpu, metadata.seq_lens_cpu)
        block_tables = metadata.block_tables
        if (
            self._plan is None
            or self._key != key
            or self._block_tables is None
            or self._block_tables.shape != block_tables.shape
            or self._block_tables.dtype != block_tables.dtype
            or not torch.equal(self._block_tables, block_tables)
        ):
            self._plan = plan_step(metadata, spec, block_size)
            self._key, self._block_tables = key, block_tables.clone()
        return self._plan


# --------------------------------------------------------------------------------------
# The per-layer implementation
# --------------------------------------------------------------------------------------


class CpuAttentionImpl(AttentionImpl):
    """One layer: writes its new keys and values with the CPU's ``reshape_and_cache``,
    then runs the step plan."""

    def __init__(self, spec: AttentionSpec, plans: _PlanCache) -> None:
        super().__init__(spec, reshape_and_cache)
        self._plans = plans

    def attend(
        self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata
    ) -> torch.Tensor:
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
        keys = self._gather(flat_cache, 0, chunk.slots).view(shape)
        values = self._gather(flat_cache, 1, chunk.slots).view(shape)
        q = query.index_select(0, chunk.token_ids).float().unsqueeze(2)  # [B, H, 1, D]
        # [B, kv_len, kv_heads, D] -> [B, kv_heads, kv_len, D]
        out = self._attend(q, keys.transpose(1, 2), values.transpose(1, 2), chunk.valid)
        return out.squeeze(2).to(query.dtype)

    def _prefill(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_size]
        flat_cache: torch.Tensor,  # [2, num_slots, num_kv_heads, head_size]
        seq: PrefillSequence,
    ) -> torch.Tensor:  # [query_len, num_heads, head_size]
        q = query[seq.start : seq.end].float().transpose(0, 1).unsqueeze(0)  # [1, H, Q, D]
        keys = self._gather(flat_cache, 0, seq.slots).transpose(0, 1).unsqueeze(0)
        values = self._gather(flat_cache, 1, seq.slots).transpose(0, 1).unsqueeze(0)
        out = self._attend(q, keys, values, seq.mask, is_causal=seq.mask is None)
        return out.squeeze(0).transpose(0, 1).to(query.dtype)

    def _gather(
        self,
        flat_cache: torch.Tensor,  # [2, num_slots, num_kv_heads, head_size]
        kv: int,  # 0 keys, 1 values
        slots: torch.Tensor,  # [num_positions] int64
    ) -> torch.Tensor:  # [num_positions, num_kv_heads, head_size] float32
        """The keys or values at ``slots`` in float32, dequantized from an FP8 cache."""
        rows = flat_cache[kv].index_select(0, slots)
        if not self.quantizes_kv_cache:
            return rows.float()
        return steps.dequantize_kv(rows, self.k_scale if kv == 0 else self.v_scale)

    def _attend(
        self,
        q: torch.Tensor,  # [B, num_heads, Q, D] float32
        keys: torch.Tensor,  # [B, num_kv_heads, K, D] float32
        values: torch.Tensor,  # [B, num_kv_heads, K, D] float32
        mask: torch.Tensor | None,  # broadcastable to [B, 1, Q, K] bool, True = attend
        is_causal: bool = False,
    ) -> torch.Tensor:  # [B, num_heads, Q, D] float32
        cap = self.spec.logit_softcap
        if cap is None:
            return F.scaled_dot_product_attention(
                q,
                keys,
                values,
                attn_mask=mask,
                is_causal=is_causal,
                scale=self.spec.scale,
                enable_gqa=self.group_size > 1,
            )
        if is_causal:
            mask = torch.ones(q.shape[2], keys.shape[2], dtype=torch.bool).tril()
        return self._softcapped(q, keys, values, mask, cap)

    def _softcapped(
        self,
        q: torch.Tensor,  # [B, num_heads, Q, D] float32
        keys: torch.Tensor,  # [B, num_kv_heads, K, D] float32
        values: torch.Tensor,  # [B, num_kv_heads, K, D] float32
        mask: torch.Tensor | None,  # broadcastable to [B, 1, Q, K] bool
        cap: float,
    ) -> torch.Tensor:  # [B, num_heads, Q, D] float32
        """Explicit masked softmax with ``cap * tanh(scores / cap)``, query-chunked."""
        batch, num_heads, num_queries, head_size = q.shape
        num_kv_heads, num_keys = keys.shape[1], keys.shape[2]
        group = self.group_size
        # Query heads of one KV head side by side, so no KV head is repeated.
        q = q.view(batch, num_kv_heads, group, num_queries, head_size)
        keys_t = keys.transpose(-1, -2)  # [B, kv_heads, D, K]
        if mask is not None:
            mask = mask.unsqueeze(-3)  # broadcastable to [B, 1, 1, Q, K]
        step = max(1, SCORE_CHUNK_ELEMENTS // max(1, batch * num_heads * num_keys))
        outputs = []
        for begin in range(0, num_queries, step):
            num = min(step, num_queries - begin)
            rows = q[..., begin : begin + num, :].reshape(batch, num_kv_heads, -1, head_size)
            scores = torch.matmul(rows, keys_t) * self.spec.scale  # [B, kv_heads, G*n, K]
            scores = torch.tanh(scores / cap) * cap
            scores = scores.view(batch, num_kv_heads, group, num, num_keys)
            if mask is not None:
                scores.masked_fill_(~mask[..., begin : begin + num, :], float("-inf"))
            probs = scores.softmax(dim=-1).view(batch, num_kv_heads, -1, num_keys)
            out = torch.matmul(probs, values)  # [B, kv_heads, G*n, D]
            outputs.append(out.view(batch, num_kv_heads, group, num, head_size))
        out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-2)
        return out.view(batch, num_heads, num_queries, head_size)
