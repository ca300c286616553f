"""The pool of KV blocks: a free queue with LRU eviction and the prefix-cache hash map."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from kvplane.kv_cache.block import KVBlock
from kvplane.kv_cache.hashing import BlockHash


class BlockPool:
    """Owns every :class:`KVBlock`; all operations are O(1) (except the checks).

    The free queue holds exactly the blocks with ``ref_count == 0``, in eviction order:
    free blocks without a hash first (they cost nothing to reuse), then cached blocks
    from least to most recently freed. A freed cached block stays findable through
    :meth:`lookup` until :meth:`allocate` evicts it. Used by :class:`BlockManager` only;
    single-threaded.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.blocks: list[KVBlock] = [KVBlock(i) for i in range(num_blocks)]
        # Keys are block ids, first = next to be reused; values unused.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[BlockHash, int] = {}
        self.num_evictions = 0  # cached blocks whose hash was dropped to reuse them

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        """Blocks with no holder, cached or not: what :meth:`allocate` can hand out."""
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks registered in the prefix cache, held or free."""
        return len(self._cached)

    def allocate(self) -> KVBlock:
        """Take the first block of the free queue, evicting its hash; ``ref_count`` = 1."""
        if not self._free:
            raise RuntimeError("no free KV block; callers must check num_free_blocks first")
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:
            del self._cached[block.block_hash]
            block.block_hash = None
            block.token_ids = None
            self.num_evictions += 1
        block.ref_count = 1
        return block

    def take(self, block_id: int) -> None:
        """Add a holder to a block (a prefix-cache hit or a fork); revives a free one."""
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1

    def release(self, block_id: int) -> None:
        """Drop a holder; at 0 the block joins the free queue, keeping its hash."""
        block = self.blocks[block_id]
        assert block.ref_count > 0, f"block {block_id} released more often than taken"
        block.ref_count -= 1
        if block.ref_count == 0:
            self._free[block_id] = None
            if block.block_hash is None:
                # Nothing to keep it for: reuse it before any cached block.
                self._free.move_to_end(block_id, last=False)

    def lookup(self, block_hash: BlockHash, token_ids: Sequence[int]) -> int | None:
        """The id of the cached block with this hash and these tokens, or None.

        Does not take the block. The token check turns a hash collision into a miss.
        """
        block_id = self._cached.get(block_hash)
        if block_id is None:
            return None
        if self.blocks[block_id].token_ids != tuple(token_ids):
            return None
        return block_id

    def register(self, block_id: int, block_hash: BlockHash, token_ids: Sequence[int]) -> bool:
        """Put a full, computed block into the prefix cache.

        Returns False (and leaves the block unhashed) when another block already holds
        this hash, e.g. two requests computed the same prefix at the same time.
        """
        block = self.blocks[block_id]
        assert block.block_hash is None, f"block {block_id} is already cached"
        # Only held blocks are registered; that keeps the free queue's unhashed-first order.
        assert block.ref_count > 0, f"block {block_id} is free"
        if block_hash in self._cached:
            return False
        block.block_hash = block_hash
        block.token_ids = tuple(token_ids)
        self._cached[block_hash] = block_id
        return True

    def reset_cache(self) -> int:
        """Forget every hash, held or free blocks alike; returns how many were dropped."""
        num_dropped = len(self._cached)
        for block_id in self._cached.values():
            self.blocks[block_id].block_hash = None
            self.blocks[block_id].token_ids = None
        self._cached.clear()
        return num_dropped

    def free_block_ids(self) -> list[int]:
        """The free queue in eviction order (first = reused next). For tests and debugging."""
        return list(self._free)

    def check_invariants(self) -> None:
        """Raise AssertionError if the free queue or hash map disagree with the blocks."""
        free = set(self._free)
        for block in self.blocks:
            check_invariant(block.ref_count >= 0, f"block {block.block_id} has ref_count < 0")
            check_invariant(
                (block.ref_count == 0) == (block.block_id in free),
                f"block {block.block_id}: ref_count {block.ref_count} but "
                f"{'in' if block.block_id in free else 'not in'} the free queue",
            )
            if block.block_hash is not None:
                check_invariant(
                    self._cached.get(block.block_hash) == block.block_id,
                    f"cached block {block.block_id} missing from the hash map",
                )
                check_invariant(
                    block.token_ids is not None, f"block {block.block_id}: no token ids"
                )
            else:
                check_invariant(block.token_ids is None, f"block {block.block_id}: stale token ids")
        seen_cached = False
        for block_id in self._free:
            is_cached = self.blocks[block_id].block_hash is not None
            check_invariant(
                is_cached or not seen_cached,
                f"free block {block_id} has no hash but follows a cached one in the queue",
            )
            seen_cached = seen_cached or is_cached
        for block_hash, block_id in self._cached.items():
            check_invariant(
                self.blocks[block_id].block_hash == block_hash,
                f"hash map points at block {block_id}, which has another hash",
            )


def check_invariant(condition: bool, message: str) -> None:
    """Raise ``AssertionError(message)`` unless ``condition``: the check behind the
    ``check_invariants`` methods of this package, which (unlike ``assert``) also runs
    under ``python -O``."""
    if not condition:
        raise AssertionError(message)
