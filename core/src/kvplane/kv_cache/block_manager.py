"""Per-request block tables on top of the block pool: allocation, prefix caching, forks."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING

from kvplane.kv_cache.block_pool import BlockPool, check_invariant
from kvplane.kv_cache.block_table_array import BlockTableArray
from kvplane.kv_cache.hashing import BlockHash, hash_block_tokens

if TYPE_CHECKING:  # the scheduler package imports this module; avoid the cycle at runtime
    from kvplane.scheduler.request import Request


class BlockManager:
    """Maps each request to the KV blocks holding its tokens.

    Token ``i`` of a request lives in block ``block_ids(request_id)[i // block_size]`` at
    offset ``i % block_size``. Blocks are allocated as the sequence grows, never reserved
    ahead. A block can be shared by several tables (a prefix-cache hit, a fork); shared
    blocks are never written: :meth:`allocate_slots` copies them first (copy-on-write).

    Called by the scheduler only, from the engine loop; not thread-safe. Every public
    method either succeeds completely or changes nothing.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self._tables: dict[str, list[int]] = {}
        # The same tables as rows of one array: what a step's inputs gather.
        self.table_array = BlockTableArray()
        # Leading blocks of each table that are already registered (or found) in the cache.
        self._num_hashed_blocks: dict[str, int] = {}
        # Chained hashes of each request's full token blocks, so nothing is hashed twice.
        self._token_hashes: dict[str, list[BlockHash]] = {}
        self.prefix_cache_queries = 0  # tokens looked up on first schedules
        self.prefix_cache_hits = 0  # of which found in the cache

    # ---------------------------------------------------------------- properties

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        """Blocks no request holds (including cached ones, which are evictable)."""
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks held by at least one request, in [0, 1]."""
        return 1.0 - self.pool.num_free_blocks / self.pool.num_blocks

    @property
    def prefix_cache_hit_rate(self) -> float:
        """``prefix_cache_hits / prefix_cache_queries`` (0.0 before any query)."""
        if self.prefix_cache_queries == 0:
            return 0.0
        return self.prefix_cache_hits / self.prefix_cache_queries

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` tokens."""
        return -(-num_tokens // self.block_size)

    def num_table_blocks(self, request_id: str) -> int:
        """The length of the request's block table (0 when it holds no blocks)."""
        return len(self._tables.get(request_id, ()))

    def block_ids(self, request_id: str) -> list[int]:
        """A copy of the request's block table ([] when it holds no blocks)."""
        return list(self._tables.get(request_id, ()))

    # ---------------------------------------------------------------- prefix cache

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """The longest cached prefix of ``request``'s full blocks: (block ids, num tokens).

        Never covers the whole sequence: at least the last token is left to compute, so
        that the step produces logits to sample from. Changes no block (pass the result
        to :meth:`allocate_slots` right away; a later allocation may evict the blocks);
        memoises the request's block hashes until :meth:`free`.
        The query is counted in the prefix-cache counters when :meth:`allocate_slots`
        takes the blocks on the request's first schedule.
        """
        if not self.enable_prefix_caching:
            return [], 0
        max_num_blocks = (request.num_tokens - 1) // self.block_size
        hashes = self._hashes_of(request, max_num_blocks)
        token_ids = request.all_token_ids
        block_ids: list[int] = []
        for i, block_hash in enumerate(hashes):
            block_id = self.pool.lookup(
                block_hash, token_ids[i * self.block_size : (i + 1) * self.block_size]
            )
            if block_id is None:
                break
            block_ids.append(block_id)
        return block_ids, len(block_ids) * self.block_size

    def cache_full_blocks(self, request: Request) -> None:
        """Register every block of ``request`` that its computed tokens now fill.

        Called by the scheduler after each step, once ``num_computed_tokens`` has
        advanced. A block whose content is already cached under another block id stays
        unregistered (the duplicate is freed normally).
        """
        table = self._tables.get(request.request_id)
        if not self.enable_prefix_caching or not table:
            return
        num_full = min(request.num_computed_tokens // self.block_size, len(table))
        start = self._num_hashed_blocks[request.request_id]
        if num_full <= start:
            return
        hashes = self._hashes_of(request, num_full)
        token_ids = request.all_token_ids
        for i in range(start, num_full):
            block = self.pool.blocks[table[i]]
            if block.block_hash is None:
                block_tokens = token_ids[i * self.block_size : (i + 1) * self.block_size]
                self.pool.register(block.block_id, hashes[i], block_tokens)
            else:
                # Shared with a request that registered it first: same content, same hash.
                assert block.block_hash == hashes[i], f"block {block.block_id} hash mismatch"
        self._num_hashed_blocks[request.request_id] = num_full

    def reset_prefix_cache(self) -> int:
        """Drop every cached hash (e.g. after a weight update); returns how many.

        Blocks stay allocated; requests keep running but their current blocks are not
        registered again.
        """
        return self.pool.reset_cache()

    # ---------------------------------------------------------------- allocation

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        computed_block_ids: Sequence[int] = (),
    ) -> list[tuple[int, int]] | None:
        """Grow ``request``'s table to hold ``num_computed_tokens + num_new_tokens`` tokens.

        ``computed_block_ids`` (from :meth:`get_computed_blocks`) may only be given on
        the request's first allocation (no table yet), with ``num_computed_tokens``
        already set to the tokens they hold; they become the start of the table.

        Returns the copy-on-write copies ``(src_block, dst_block)`` the runner must apply,
        in list order, before the step writes any KV: one per block the new tokens fall
        into that is shared with another table (the fresh copy replaces it in this
        table). Returns None, changing nothing, when the free blocks do not suffice.
        """
        rid = request.request_id
        table = self._tables.get(rid)
        if num_new_tokens == 1 and table is not None and not computed_block_ids:
            # A decode step (every running request, every step): its token falls into an
            # existing block of this table alone, or it takes the general path.
            index = request.num_computed_tokens // self.block_size
            if index < len(table) and self.pool.blocks[table[index]].ref_count == 1:
                return []
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens}")
        if computed_block_ids:
            if table is not None:
                raise ValueError(f"request {rid!r} already has blocks; cannot take cached ones")
            if request.num_computed_tokens != len(computed_block_ids) * self.block_size:
                raise ValueError(
                    f"request {rid!r}: num_computed_tokens={request.num_computed_tokens} "
                    f"does not match {len(computed_block_ids)} cached blocks"
                )
        current: list[int] = table if table is not None else []
        num_tokens = request.num_computed_tokens + num_new_tokens
        num_fresh = max(0, self.num_blocks_for(num_tokens) - len(current) - len(computed_block_ids))
        cow_indices: list[int] = []
        if num_new_tokens > 0:
            first = request.num_computed_tokens // self.block_size
            last = min((num_tokens - 1) // self.block_size, len(current) - 1)
            blocks = self.pool.blocks
            cow_indices = [i for i in range(first, last + 1) if blocks[current[i]].ref_count > 1]
        num_revived = sum(1 for b in computed_block_ids if self.pool.blocks[b].ref_count == 0)
        if num_fresh + len(cow_indices) + num_revived > self.pool.num_free_blocks:
            return None

        if table is None:
            table = self._tables[rid] = []
            self._num_hashed_blocks[rid] = len(computed_block_ids)
            if self.enable_prefix_caching and request.num_preemptions == 0:
                self.prefix_cache_queries += request.num_tokens
                self.prefix_cache_hits += request.num_computed_tokens
        first_changed = cow_indices[0] if cow_indices else len(table)
        # Take the cached blocks before allocating, so allocation cannot evict them.
        for block_id in computed_block_ids:
            self.pool.take(block_id)
            table.append(block_id)
        copies: list[tuple[int, int]] = []
        for i in cow_indices:
            fresh = self.pool.allocate()
            copies.append((table[i], fresh.block_id))
            self.pool.release(table[i])  # still held by the other tables
            table[i] = fresh.block_id
        for _ in range(num_fresh):
            table.append(self.pool.allocate().block_id)
        if first_changed < len(table) or rid not in self.table_array:
            self.table_array.write(rid, first_changed, table[first_changed:])
        return copies

    def free(self, request: Request) -> None:
        """Release all of ``request``'s blocks (cached ones stay findable until evicted).

        Idempotent. Tail blocks are released first so that they are evicted first: a
        long prefix is less likely to be reused than its beginning.
        """
        rid = request.request_id
        for block_id in reversed(self._tables.pop(rid, ())):
            self.pool.release(block_id)
        self.table_array.release(rid)
        self._num_hashed_blocks.pop(rid, None)
        self._token_hashes.pop(rid, None)

    def trim(self, request: Request, num_tokens: int) -> None:
        """Release the blocks of ``request``'s table past those that hold ``num_tokens``
        tokens: the blocks only its rejected draft tokens (speculative decoding) used.

        Such blocks hold no cached content (only computed tokens are hashed), and the
        scheduler allocates again when the request grows into them.
        """
        rid = request.request_id
        table = self._tables.get(rid)
        num_kept = self.num_blocks_for(num_tokens)
        if table is None or num_kept >= len(table):
            return
        assert self._num_hashed_blocks[rid] <= num_kept, f"{rid!r}: trimming a cached block"
        for block_id in reversed(table[num_kept:]):
            self.pool.release(block_id)
        del table[num_kept:]
        self.table_array.write(rid, num_kept, [])

    def fork(self, parent: Request, child: Request) -> None:
        """Give ``child`` the same block table as ``parent``, sharing every block.

        The child must hold no blocks. Writes by either side into a shared block go
        through copy-on-write in :meth:`allocate_slots`.
        """
        table = self._tables.get(parent.request_id)
        if table is None:
            raise ValueError(f"parent {parent.request_id!r} holds no blocks to fork")
        if child.request_id in self._tables:
            raise ValueError(f"child {child.request_id!r} already holds blocks")
        for block_id in table:
            self.pool.take(block_id)
        self._tables[child.request_id] = list(table)
        self.table_array.write(child.request_id, 0, table)
        self._num_hashed_blocks[child.request_id] = self._num_hashed_blocks[parent.request_id]

    # ---------------------------------------------------------------- internals

    def _hashes_of(self, request: Request, num_blocks: int) -> list[BlockHash]:
        """Hashes of ``request``'s first ``num_blocks`` full blocks (memoised, extended)."""
        known = self._token_hashes.get(request.request_id, [])
        if len(known) < num_blocks:
            extra_keys: tuple[Hashable, ...] = ()
            if request.cache_salt is not None:
                extra_keys = (("cache_salt", request.cache_salt),)
            known = hash_block_tokens(
                request.all_token_ids, self.block_size, num_blocks, extra_keys, known
            )
            self._token_hashes[request.request_id] = known
        return known[:num_blocks]

    def check_invariants(self) -> None:
        """Raise AssertionError if tables, ref counts, free queue or hash map disagree.

        Ref counts equal the number of tables holding each block, no table holds a block
        twice, the free queue is exactly the unheld blocks, the hash map matches the
        blocks, the table array holds the tables. O(num_blocks + total table length);
        meant for tests.
        """
        self.pool.check_invariants()
        holders = [0] * self.pool.num_blocks
        for rid, table in self._tables.items():
            check_invariant(len(set(table)) == len(table), f"table of {rid!r} repeats a block")
            check_invariant(rid in self._num_hashed_blocks, f"no hashed-block count for {rid!r}")
            check_invariant(
                self._num_hashed_blocks[rid] <= len(table), f"{rid!r}: bad hashed count"
            )
            for block_id in table:
                holders[block_id] += 1
        self.table_array.check_invariants(self._tables)
        for block in self.pool.blocks:
            check_invariant(
                block.ref_count == holders[block.block_id],
                f"block {block.block_id}: ref_count {block.ref_count} but held by "
                f"{holders[block.block_id]} tables",
            )
