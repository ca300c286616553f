"""One KV block (page) as the allocator sees it; the tensors live with the model runner."""

from __future__ import annotations

from dataclasses import dataclass

from kvplane.kv_cache.hashing import BlockHash


@dataclass(slots=True, eq=False)
class KVBlock:
    """Bookkeeping for block ``block_id`` (slots ``block_id * block_size + offset``).

    ``ref_count`` is the number of request block tables holding the block; at 0 the block
    sits in the pool's free queue. ``block_hash`` is set once the block is full of
    computed tokens and registered in the prefix cache, together with the ``token_ids``
    it was hashed from (checked on every hit); both are cleared when the block is evicted
    for reuse.
    """

    block_id: int
    ref_count: int = 0
    block_hash: BlockHash | None = None
    token_ids: tuple[int, ...] | None = None

    @property
    def is_cached(self) -> bool:
        return self.block_hash is not None
