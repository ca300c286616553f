"""Paged attention on MPS: a torch path for every batch, and a Metal decode kernel.

- :class:`MetalTorchAttentionBackend` serves every spec with a few large torch calls
  that MPS runs well: per step, one plan shared by every layer (the cache slots each
  sequence reads and the masks, computed on the device from the block tables), decodes
  batched over their gathered, padded context, each prefill through
  ``scaled_dot_product_attention``. The query heads of one KV head are stacked as rows
  (``[B, num_kv_heads, group * Q, D]``), so grouped-query attention needs neither
  repeated keys nor SDPA's ``enable_gqa``. Everything computes in float32 and returns
  the query dtype, as the reference; no float64 (MPS has none).
- :class:`MetalShaderAttentionBackend` (offered only where the shader compiles, i.e. on
  a Mac) runs pure-decode steps through the paged-decode Metal kernel
  (:mod:`kvplane_metal.kernels.paged_decode`) and every other step through the torch
  path above, which stays the fallback.

Neither reads an FP8 cache (MPS has no float8) or can be captured.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvplane.attention.backend import AttentionBackend, AttentionImpl
from kvplane.attention.metadata import AttentionMetadata
from kvplane.plugins.types import AttentionSpec

#: Upper bound, in float32 elements, of one decode chunk's gathered keys plus values.
DECODE_CHUNK_ELEMENTS = 1 << 24


class MetalTorchAttentionBackend(AttentionBackend):
    """Any head size, block size, GQA ratio, sliding window and soft-cap, over a float16,
    bfloat16 or float32 cache."""

    name = "metal-torch"
    priority = 10

    def __init__(self) -> None:
        # Shared by every layer of a spec, so a step is planned once per spec.
        self._plans: dict[AttentionSpec, _PlanCache] = {}

    def cannot_serve(self, spec: AttentionSpec) -> str | None:
        if (reason := super().cannot_serve(spec)) is not None:
            return reason
        for what, dtype in (("dtype", spec.dtype), ("kv_cache_dtype", spec.kv_cache_dtype)):
            if dtype is not None and dtype not in (torch.float16, torch.bfloat16, torch.float32):
                return f"{what} {dtype} is not float16, bfloat16 or float32 (MPS)"
        return None

    def make_impl(self, spec: AttentionSpec) -> AttentionImpl:
        return MetalTorchAttentionImpl(spec, self._plans.setdefault(spec, _PlanCache()))


class MetalShaderAttentionBackend(MetalTorchAttentionBackend):
    """Pure decodes through the Metal kernel (float16 and float32, head size up to its
    limit); the rest through the torch path."""

    name = "metal-shader"
    priority = 20

    def cannot_serve(self, spec: AttentionSpec) -> str | None:
        from kvplane_metal.kernels import paged_decode

        if (reason := super().cannot_serve(spec)) is not None:
            return reason
        if (reason := paged_decode.unavailable_reason()) is not None:
            return reason
        return paged_decode.cannot_serve(spec.dtype, spec.kv_cache_dtype, spec.head_size)

    def make_impl(self, spec: AttentionSpec) -> AttentionImpl:
        return MetalShaderAttentionImpl(spec, self._plans.setdefault(spec, _PlanCache()))


# --------------------------------------------------------------------------------------
# The per-step plan
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DecodeChunk:
    """Sequences with one new token each, attended together over a padded context."""

    token_ids: torch.Tensor  # [num_seqs] int64 on the device, rows of the query
    slots: torch.Tensor  # [num_seqs * kv_len] int64 on the device
    valid: torch.Tensor  # [num_seqs, 1, 1, kv_len] bool on the device
    num_seqs: int
    kv_len: int


@dataclass(frozen=True, slots=True)
class PrefillSequence:
    """One sequence with several new tokens: query rows ``start:end`` over its keys."""

    start: int
    end: int
    slots: torch.Tensor  # [num_keys] int64 on the device
    mask: torch.Tensor  # [query_len, num_keys] bool on the device


@dataclass(frozen=True, slots=True)
class StepPlan:
    decode_chunks: tuple[DecodeChunk, ...]
    prefills: tuple[PrefillSequence, ...]


def plan_step(metadata: AttentionMetadata, spec: AttentionSpec, block_size: int) -> StepPlan:
    """Split a batch into decode chunks and prefill sequences. Positions and masks are
    made on the host from the ``*_cpu`` lengths and copied once; slots are gathered from
    the block tables on the device (no sync)."""
    device = metadata.block_tables.device
    starts, seq_lens = metadata.query_start_loc_cpu, metadata.seq_lens_cpu
    window = spec.sliding_window
    decode_ids: list[int] = []
    prefills: list[PrefillSequence] = []
    for index, seq_len in enumerate(seq_lens):
        query_len = starts[index + 1] - starts[index]
        if query_len == 1:
            decode_ids.append(index)
        elif query_len > 1:
            num_cached = seq_len - query_len
            first_key = 0 if window is None else max(0, num_cached + 1 - window)
            keys = torch.arange(first_key, seq_len)  # [num_keys]
            queries = torch.arange(num_cached, seq_len).unsqueeze(1)  # [query_len, 1]
            mask = keys.unsqueeze(0) <= queries  # [query_len, num_keys]
            if window is not None:
                mask &= keys.unsqueeze(0) > queries - window
            table = metadata.block_tables[index : index + 1].long()
            slots = _slots(table, keys.unsqueeze(0).to(device), block_size).flatten()
            start = starts[index]
            prefills.append(PrefillSequence(start, start + query_len, slots, mask.to(device)))
    visible = {i: seq_lens[i] if window is None else min(seq_lens[i], window) for i in decode_ids}
    per_position = 2 * spec.num_kv_heads * spec.head_size
    chunks: list[DecodeChunk] = []
    group: list[int] = []
    for index in sorted(decode_ids, key=lambda i: visible[i], reverse=True):
        if group and (len(group) + 1) * visible[group[0]] * per_position > DECODE_CHUNK_ELEMENTS:
            chunks.append(_decode_chunk(metadata, block_size, group, visible[group[0]]))
            group = []
        group.append(index)
    if group:
        chunks.append(_decode_chunk(metadata, block_size, group, visible[group[0]]))
    return StepPlan(tuple(chunks), tuple(prefills))


def _decode_chunk(
    metadata: AttentionMetadata, block_size: int, seq_ids: list[int], kv_len: int
) -> DecodeChunk:
    device = metadata.block_tables.device
    lengths = torch.tensor([metadata.seq_lens_cpu[i] for i in seq_ids]).unsqueeze(1)
    # Each sequence's last ``kv_len`` positions (from 0 when shorter); padding re-reads
    # its last key, so it never touches another sequence's blocks.
    positions = (lengths - kv_len).clamp(min=0) + torch.arange(kv_len)  # [num_seqs, kv_len]
    valid = positions < lengths
    positions = torch.minimum(positions, lengths - 1)
    ids = torch.tensor(seq_ids, device=device)
    tables = metadata.block_tables.index_select(0, ids).long()
    slots = _slots(tables, positions.to(device), block_size)
    token_ids = torch.tensor([metadata.query_start_loc_cpu[i] for i in seq_ids], device=device)
    valid = valid[:, None, None, :].to(device)
    return DecodeChunk(token_ids, slots.flatten(), valid, len(seq_ids), kv_len)


def _slots(
    block_tables: torch.Tensor,  # [num_seqs, max_num_blocks] int64
    positions: torch.Tensor,  # [num_seqs, num_positions] int64
    block_size: int,
) -> torch.Tensor:  # [num_seqs, num_positions] int64
    block_ids = block_tables.gather(1, positions // block_size)
    return block_ids * block_size + positions % block_size


class _PlanCache:
    """The plan of the step whose metadata it was made for, shared by every layer.

    The runner builds one :class:`AttentionMetadata` per step and never mutates it, so
    the same object (held here, so its id cannot be reused) with the same lengths means
    the same step.
    """

    def __init__(self) -> None:
        self._key: tuple[object, ...] | None = None
        self._plan: StepPlan | None = None

    def get(self, metadata: AttentionMetadata, spec: AttentionSpec, block_size: int) -> StepPlan:
        key = (metadata, block_size, metadata.query_start_loc_cpu, metadata.seq_lens_cpu)
        if self._plan is None or self._key is None or not _same_key(self._key, key):
            self._plan = plan_step(metadata, spec, block_size)
            self._key = key
        return self._plan


def _same_key(old: tuple[object, ...], new: tuple[object, ...]) -> bool:
    return old[0] is new[0] and old[1:] == new[1:]


# --------------------------------------------------------------------------------------
# The per-layer implementations
# --------------------------------------------------------------------------------------


class MetalTorchAttentionImpl(AttentionImpl):
    """One layer: the core's ``reshape_and_cache`` writes the cache (``index_copy_``),
    then the step plan runs."""

    def __init__(self, spec: AttentionSpec, plans: _PlanCache) -> None:
        super().__init__(spec)
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
        num_kv_heads, head_size = flat_cache.shape[-2:]
        shape = (chunk.num_seqs, chunk.kv_len, num_kv_heads, head_size)
        keys = flat_cache[0].index_select(0, chunk.slots).view(shape).float().transpose(1, 2)
        values = flat_cache[1].index_select(0, chunk.slots).view(shape).float().transpose(1, 2)
        q = query.index_select(0, chunk.token_ids).float()  # [B, H, D]
        q = q.view(chunk.num_seqs, num_kv_heads, self.group_size, head_size)
        out = self._attend(q, keys, values, chunk.valid)  # [B, kv_heads, group, D]
        return out.reshape(chunk.num_seqs, -1, head_size).to(query.dtype)

    def _prefill(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_size]
        flat_cache: torch.Tensor,  # [2, num_slots, num_kv_heads, head_size]
        seq: PrefillSequence,
    ) -> torch.Tensor:  # [query_len, num_heads, head_size]
        num_kv_heads, head_size = flat_cache.shape[-2:]
        query_len, group = seq.end - seq.start, self.group_size
        keys = flat_cache[0].index_select(0, seq.slots).float().transpose(0, 1).unsqueeze(0)
        values = flat_cache[1].index_select(0, seq.slots).float().transpose(0, 1).unsqueeze(0)
        # Rows g * query_len + q: query q of head kv * group + g.
        q = query[seq.start : seq.end].float().view(query_len, num_kv_heads, group, head_size)
        q = q.permute(1, 2, 0, 3).reshape(1, num_kv_heads, group * query_len, head_size)
        mask = seq.mask.repeat(group, 1)[None, None]  # [1, 1, group * query_len, num_keys]
        out = self._attend(q, keys, values, mask)  # [1, kv_heads, group * query_len, D]
        out = out.view(num_kv_heads, group, query_len, head_size).permute(2, 0, 1, 3)
        return out.reshape(query_len, -1, head_size).to(query.dtype)

    def _attend(
        self,
        q: torch.Tensor,  # [B, num_kv_heads, R, D] float32 (R rows per KV head)
        keys: torch.Tensor,  # [B, num_kv_heads, K, D] float32
        values: torch.Tensor,  # [B, num_kv_heads, K, D] float32
        mask: torch.Tensor,  # broadcastable to [B, 1, R, K] bool, True = attend
    ) -> torch.Tensor:  # [B, num_kv_heads, R, D] float32
        cap = self.spec.logit_softcap
        if cap is None:
            return F.scaled_dot_product_attention(
                q, keys, values, attn_mask=mask, scale=self.spec.scale
            )
        scores = torch.matmul(q, keys.transpose(-1, -2)) * self.spec.scale
        scores = torch.tanh(scores / cap).mul_(cap).masked_fill_(~mask, float("-inf"))
        return torch.matmul(scores.softmax(dim=-1), values)


class MetalShaderAttentionImpl(MetalTorchAttentionImpl):
    """Steps of one new token per sequence through the Metal kernel, the rest through
    the torch path."""

    def attend(
        self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata
    ) -> torch.Tensor:
        if metadata.max_query_len != 1 or metadata.num_tokens != metadata.num_seqs:
            return super().attend(query, kv_cache, metadata)
        from kvplane_metal.kernels import paged_decode

        output = torch.empty(query.shape, dtype=query.dtype, device=query.device)
        paged_decode.paged_decode(
            output,
            query,
            kv_cache,
            metadata.block_tables,
            metadata.seq_lens,
            self.spec.scale,
            self.spec.sliding_window,
            self.spec.logit_softcap,
        )
        return output
