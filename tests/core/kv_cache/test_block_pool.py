"""BlockPool: free queue order, eviction, hash map and the token check on hits."""

from __future__ import annotations

import pytest

from kvplane.kv_cache import BlockPool, hash_block


def test_allocate_take_release_and_queue_order() -> None:
    pool = BlockPool(4)
    a, b, c = pool.allocate(), pool.allocate(), pool.allocate()
    assert [a.block_id, b.block_id, c.block_id] == [0, 1, 2]
    assert pool.num_free_blocks == 1
    pool.register(a.block_id, hash_block(None, [1]), [1])
    pool.register(c.block_id, hash_block(None, [3]), [3])
    pool.release(c.block_id)  # cached: to the back
    pool.release(a.block_id)  # cached: to the back, after c
    pool.release(b.block_id)  # not cached: to the front
    assert pool.free_block_ids() == [1, 3, 2, 0]
    pool.check_invariants()

    pool.take(a.block_id)  # a cache hit revives a free block
    assert a.ref_count == 1
    assert pool.free_block_ids() == [1, 3, 2]
    pool.take(a.block_id)
    assert a.ref_count == 2
    pool.check_invariants()


def test_eviction_drops_the_hash() -> None:
    pool = BlockPool(1)
    block = pool.allocate()
    h = hash_block(None, [5, 6])
    assert pool.register(block.block_id, h, [5, 6])
    pool.release(block.block_id)
    assert pool.lookup(h, [5, 6]) == block.block_id
    again = pool.allocate()
    assert again is block
    assert block.block_hash is None and block.token_ids is None
    assert pool.lookup(h, [5, 6]) is None
    assert pool.num_evictions == 1
    pool.check_invariants()
    with pytest.raises(RuntimeError, match="no free KV block"):
        pool.allocate()


def test_hash_collision_is_a_miss() -> None:
    pool = BlockPool(2)
    block = pool.allocate()
    h = hash_block(None, [1, 2])
    pool.register(block.block_id, h, [1, 2])
    assert pool.lookup(h, [1, 2]) == block.block_id
    assert pool.lookup(h, [1, 3]) is None  # same hash, other tokens


def test_register_refuses_a_second_block_with_the_same_hash() -> None:
    pool = BlockPool(2)
    a, b = pool.allocate(), pool.allocate()
    h = hash_block(None, [1])
    assert pool.register(a.block_id, h, [1])
    assert not pool.register(b.block_id, h, [1])
    assert b.block_hash is None
    pool.check_invariants()


def test_reset_cache_and_invariant_checks() -> None:
    pool = BlockPool(3)
    a = pool.allocate()
    pool.register(a.block_id, hash_block(None, [1]), [1])
    pool.release(a.block_id)
    assert pool.reset_cache() == 1
    assert pool.num_cached_blocks == 0
    pool.check_invariants()
    a.ref_count = 1  # held but still in the free queue
    with pytest.raises(AssertionError, match="free queue"):
        pool.check_invariants()
