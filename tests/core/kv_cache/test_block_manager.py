"""BlockManager: allocation, freeing, prefix caching, forks and copy-on-write."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kvplane.kv_cache import BlockManager
from kvplane.scheduler import Request

BLOCK_SIZE = 4


def make_request(request_id: str, tokens: list[int], cache_salt: str | None = None) -> Request:
    return Request(request_id, tokens, None, 0.0, cache_salt=cache_salt)


@pytest.fixture
def bm() -> Iterator[BlockManager]:
    manager = BlockManager(num_blocks=8, block_size=BLOCK_SIZE)
    yield manager
    manager.check_invariants()


def compute(bm: BlockManager, request: Request, num_new: int) -> list[tuple[int, int]]:
    """Allocate ``num_new`` tokens, pretend the model ran them, cache full blocks."""
    copies = bm.allocate_slots(request, num_new)
    assert copies is not None
    request.num_computed_tokens += num_new
    bm.cache_full_blocks(request)
    bm.check_invariants()
    return copies


def admit(bm: BlockManager, request: Request) -> int:
    """First schedule with prefix caching, computing the whole rest; returns cached tokens."""
    block_ids, num_cached = bm.get_computed_blocks(request)
    request.num_computed_tokens = num_cached
    assert bm.allocate_slots(request, request.num_tokens - num_cached, block_ids) is not None
    request.num_computed_tokens = request.num_tokens
    bm.cache_full_blocks(request)
    bm.check_invariants()
    return num_cached


def ref_counts(bm: BlockManager, block_ids: list[int]) -> list[int]:
    return [bm.pool.blocks[b].ref_count for b in block_ids]


def test_allocation_grows_block_by_block(bm: BlockManager) -> None:
    request = make_request("a", list(range(9)))  # prefilled in chunks of 5, 3 and 1
    compute(bm, request, 5)
    assert len(bm.block_ids("a")) == 2
    assert bm.num_free_blocks == 6
    assert bm.usage == pytest.approx(2 / 8)
    compute(bm, request, 3)  # 8 tokens: still 2 blocks
    assert len(bm.block_ids("a")) == 2
    compute(bm, request, 1)
    assert len(bm.block_ids("a")) == 3
    assert ref_counts(bm, bm.block_ids("a")) == [1, 1, 1]
    assert compute(bm, request, 0) == []


def test_not_enough_blocks_returns_none_and_changes_nothing(bm: BlockManager) -> None:
    a = make_request("a", list(range(24)))
    compute(bm, a, 24)  # 6 of 8 blocks
    b = make_request("b", list(range(100, 112)))
    assert bm.allocate_slots(b, 12) is None  # needs 3
    assert bm.block_ids("b") == []
    assert bm.num_free_blocks == 2
    bm.check_invariants()
    assert bm.allocate_slots(b, 8) == []


def test_free_returns_every_block(bm: BlockManager) -> None:
    request = make_request("a", list(range(10)))
    compute(bm, request, 10)
    blocks = bm.block_ids("a")
    bm.free(request)
    assert bm.block_ids("a") == []
    assert bm.num_free_blocks == 8
    assert ref_counts(bm, blocks) == [0, 0, 0]
    bm.free(request)  # idempotent


def test_prefix_hit_on_shared_prefix(bm: BlockManager) -> None:
    a = make_request("a", [1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    assert admit(bm, a) == 0
    b = make_request("b", [1, 2, 3, 4, 5, 6, 7, 8, 42])
    block_ids, num_cached = bm.get_computed_blocks(b)
    assert block_ids == bm.block_ids("a")[:2]
    assert num_cached == 8
    assert admit(bm, b) == 8
    assert bm.block_ids("b")[:2] == bm.block_ids("a")[:2]
    assert bm.block_ids("b")[2] != bm.block_ids("a")[2]
    assert ref_counts(bm, bm.block_ids("b")) == [2, 2, 1]


def test_same_block_after_a_different_prefix_does_not_hit(bm: BlockManager) -> None:
    # Without chained hashes, c's second block would match a's second block.
    admit(bm, make_request("a", [1, 1, 1, 1, 5, 6, 7, 8, 0]))
    admit(bm, make_request("b", [9, 9, 9, 9, 0, 0, 0, 0, 0]))
    c = make_request("c", [9, 9, 9, 9, 5, 6, 7, 8, 0])
    block_ids, num_cached = bm.get_computed_blocks(c)
    assert block_ids == bm.block_ids("b")[:1]
    assert num_cached == 4


def test_never_the_whole_sequence(bm: BlockManager) -> None:
    admit(bm, make_request("a", list(range(9))))  # 2 full blocks cached
    same = make_request("b", list(range(8)))
    assert bm.get_computed_blocks(same) == (bm.block_ids("a")[:1], 4)
    longer = make_request("c", list(range(9)))
    assert bm.get_computed_blocks(longer) == (bm.block_ids("a")[:2], 8)
    single = make_request("d", [0])
    assert bm.get_computed_blocks(single) == ([], 0)


def test_freed_blocks_stay_cached_until_evicted_lru_first() -> None:
    bm = BlockManager(num_blocks=6, block_size=BLOCK_SIZE)
    requests = [make_request(f"r{i}", [i] * 4 + [99]) for i in range(3)]
    for request in requests:
        admit(bm, request)  # one full (cached) block and one partial block each
    full_blocks = [bm.block_ids(r.request_id)[0] for r in requests]
    for request in (requests[1], requests[0], requests[2]):
        bm.free(request)
        bm.check_invariants()
    # Unhashed free blocks come first, then cached ones least recently freed first.
    free = bm.pool.free_block_ids()
    assert not any(bm.pool.blocks[b].is_cached for b in free[:3])
    assert free[3:] == [full_blocks[1], full_blocks[0], full_blocks[2]]
    for request, block_id in zip(requests, full_blocks, strict=True):  # all still findable
        assert bm.get_computed_blocks(request) == ([block_id], 4)
    # Four new blocks: the three unhashed ones, then r1's (least recently freed) is evicted.
    assert bm.allocate_slots(make_request("x", list(range(50, 66))), 16) == []
    assert bm.pool.num_evictions == 1
    assert bm.get_computed_blocks(requests[1]) == ([], 0)
    assert bm.get_computed_blocks(requests[0]) == ([full_blocks[0]], 4)
    assert bm.get_computed_blocks(requests[2]) == ([full_blocks[2]], 4)
    bm.check_invariants()


def test_taking_a_cached_free_block_counts_against_free_blocks() -> None:
    bm = BlockManager(num_blocks=3, block_size=BLOCK_SIZE)
    a = make_request("a", list(range(9)))
    admit(bm, a)
    bm.free(a)
    b = make_request("b", [*range(8), 7, 7, 7, 7, 7])  # hits a's 2 blocks, needs 2 more
    block_ids, num_cached = bm.get_computed_blocks(b)
    assert num_cached == 8
    b.num_computed_tokens = num_cached
    assert bm.allocate_slots(b, 5, block_ids) is None  # 2 revived + 2 fresh > 3 free
    bm.check_invariants()
    assert bm.allocate_slots(b, 4, block_ids) == []  # 2 revived + 1 fresh
    assert bm.block_ids("b")[:2] == block_ids


def test_fork_shares_blocks_and_copy_on_write(bm: BlockManager) -> None:
    parent = make_request("p", list(range(6)))
    compute(bm, parent, 6)
    child = make_request("c", list(range(6)))
    bm.fork(parent, child)
    child.num_computed_tokens = 6
    shared = bm.block_ids("p")
    assert bm.block_ids("c") == shared
    assert ref_counts(bm, shared) == [2, 2]
    bm.check_invariants()

    child.append_output_token(7)  # position 6 falls into the shared, partial block 1
    copies = compute(bm, child, 1)
    fresh = bm.block_ids("c")[1]
    assert copies == [(shared[1], fresh)]
    assert bm.block_ids("c") == [shared[0], fresh]
    assert ref_counts(bm, shared) == [2, 1]
    assert ref_counts(bm, [fresh]) == [1]

    parent.append_output_token(8)  # block 1 is the parent's alone now: no copy
    assert compute(bm, parent, 1) == []
    assert bm.block_ids("p") == shared

    bm.free(parent)
    assert ref_counts(bm, shared) == [1, 0]
    bm.free(child)
    assert bm.num_free_blocks == 8


def test_copy_on_write_needs_a_free_block() -> None:
    bm = BlockManager(num_blocks=2, block_size=BLOCK_SIZE)
    parent = make_request("p", list(range(6)))
    compute(bm, parent, 6)
    child = make_request("c", list(range(6)))
    bm.fork(parent, child)
    child.num_computed_tokens = 6
    child.append_output_token(1)
    assert bm.allocate_slots(child, 1) is None
    assert bm.block_ids("c") == bm.block_ids("p")
    bm.check_invariants()


def test_fork_validation(bm: BlockManager) -> None:
    parent = make_request("p", [1, 2])
    with pytest.raises(ValueError, match="holds no blocks"):
        bm.fork(parent, make_request("c", [1, 2]))
    compute(bm, parent, 2)
    other = make_request("o", [3])
    compute(bm, other, 1)
    with pytest.raises(ValueError, match="already holds blocks"):
        bm.fork(parent, other)


def test_allocate_slots_validation(bm: BlockManager) -> None:
    a = make_request("a", list(range(9)))
    admit(bm, a)
    b = make_request("b", list(range(9)))
    block_ids, num_cached = bm.get_computed_blocks(b)
    with pytest.raises(ValueError, match="does not match"):
        bm.allocate_slots(b, 9, block_ids)  # num_computed_tokens not set to num_cached
    b.num_computed_tokens = num_cached
    assert bm.allocate_slots(b, 1, block_ids) == []
    with pytest.raises(ValueError, match="already has blocks"):
        bm.allocate_slots(b, 1, block_ids)
    with pytest.raises(ValueError, match=">= 0"):
        bm.allocate_slots(b, -1)


def test_prefix_cache_counters_count_first_schedules_only(bm: BlockManager) -> None:
    admit(bm, make_request("a", list(range(10))))
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits) == (10, 0)
    b = make_request("b", list(range(12)))
    admit(bm, b)
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits) == (22, 8)
    assert bm.prefix_cache_hit_rate == pytest.approx(8 / 22)
    # A preempted request resuming is not a new query.
    bm.free(b)
    b.num_preemptions = 1
    b.num_computed_tokens = 0
    admit(bm, b)
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits) == (22, 8)
    # Looking up without taking the blocks counts nothing.
    bm.get_computed_blocks(make_request("c", list(range(12))))
    assert bm.prefix_cache_queries == 22


def test_cache_salt_isolates_prefixes(bm: BlockManager) -> None:
    admit(bm, make_request("a", list(range(9)), cache_salt="alice"))
    assert bm.get_computed_blocks(make_request("b", list(range(9))))[1] == 0
    assert bm.get_computed_blocks(make_request("c", list(range(9)), "bob"))[1] == 0
    assert bm.get_computed_blocks(make_request("d", list(range(9)), "alice"))[1] == 8


def test_duplicate_content_stays_unregistered(bm: BlockManager) -> None:
    # Two requests compute the same block at the same time; only one is registered.
    a = make_request("a", list(range(5)))
    b = make_request("b", list(range(5)))
    assert bm.allocate_slots(a, 5) is not None
    assert bm.allocate_slots(b, 5) is not None
    a.num_computed_tokens = b.num_computed_tokens = 5
    bm.cache_full_blocks(a)
    bm.cache_full_blocks(b)
    bm.check_invariants()
    assert bm.pool.num_cached_blocks == 1
    assert bm.pool.blocks[bm.block_ids("a")[0]].is_cached
    assert not bm.pool.blocks[bm.block_ids("b")[0]].is_cached
    bm.free(b)
    assert bm.get_computed_blocks(make_request("c", list(range(5)))) == (bm.block_ids("a")[:1], 4)


def test_reset_prefix_cache(bm: BlockManager) -> None:
    a = make_request("a", list(range(9)))
    admit(bm, a)
    assert bm.reset_prefix_cache() == 2
    assert bm.get_computed_blocks(make_request("b", list(range(9)))) == ([], 0)
    bm.check_invariants()
    a.append_output_token(3)
    a.append_output_token(3)
    a.append_output_token(3)
    compute(bm, a, 3)  # the third block fills up and is registered; earlier ones are not
    assert bm.pool.num_cached_blocks == 1


def test_prefix_caching_disabled() -> None:
    bm = BlockManager(num_blocks=8, block_size=BLOCK_SIZE, enable_prefix_caching=False)
    admit(bm, make_request("a", list(range(9))))
    assert bm.pool.num_cached_blocks == 0
    assert bm.get_computed_blocks(make_request("b", list(range(9)))) == ([], 0)
    assert bm.prefix_cache_queries == 0
    bm.check_invariants()


def test_check_invariants_detects_corruption(bm: BlockManager) -> None:
    a = make_request("a", list(range(6)))
    compute(bm, a, 6)
    bm.pool.blocks[bm.block_ids("a")[0]].ref_count += 1
    with pytest.raises(AssertionError, match="held by 1 tables"):
        bm.check_invariants()
    bm.pool.blocks[bm.block_ids("a")[0]].ref_count -= 1


def test_constructor_validation() -> None:
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(num_blocks=4, block_size=0)
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(num_blocks=0, block_size=4)
