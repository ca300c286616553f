"""The block manager's table array against its lists, through growth, forks, copies and frees."""

from __future__ import annotations

import random

import numpy as np

from kvplane.kv_cache.block_manager import BlockManager
from kvplane.kv_cache.block_table_array import BlockTableArray
from kvplane.scheduler.request import Request


def test_rows_are_reused_zeroed_and_the_array_grows() -> None:
    tables = BlockTableArray(num_rows=1, num_cols=2)
    tables.write("a", 0, [5, 6, 7])  # wider than the array
    tables.write("b", 0, [1])  # more rows than the array
    assert tables.array.shape[0] >= 2 and tables.array.shape[1] >= 3
    assert tables.array[tables.row_of("a"), :4].tolist() == [5, 6, 7, 0]
    tables.write("a", 1, [9])  # a shorter end clears the tail
    assert tables.array[tables.row_of("a"), :3].tolist() == [5, 9, 0]
    row_a = tables.row_of("a")
    tables.release("a")
    assert "a" not in tables and not tables.array[row_a].any()
    tables.write("c", 0, [3])
    assert tables.row_of("c") == row_a
    tables.check_invariants({"b": [1], "c": [3]})


def test_block_manager_keeps_the_array_equal_to_its_tables() -> None:
    """Random allocations, prefix hits, forks (copy-on-write) and frees, the invariant
    checked after each."""
    rng = random.Random(0)
    manager = BlockManager(num_blocks=64, block_size=4)
    requests: dict[str, Request] = {}
    for step in range(400):
        action = rng.random()
        if action < 0.3 or not requests:
            prefix = [1, 2, 3, 4, 5, 6, 7, 8] if rng.random() < 0.5 else []
            prompt = prefix + [rng.randrange(100) for _ in range(rng.randrange(1, 12))]
            request = Request(f"r{step}", prompt, None, 0.0)
            cached, num_cached = manager.get_computed_blocks(request)
            request.num_computed_tokens = num_cached
            if manager.allocate_slots(request, request.num_tokens - num_cached, cached) is None:
                request.num_computed_tokens = 0
                continue
            request.num_computed_tokens = request.num_tokens
            manager.cache_full_blocks(request)
            requests[request.request_id] = request
        elif action < 0.45:
            parent = requests[rng.choice(sorted(requests))]
            child = Request(f"c{step}", list(parent.prompt_token_ids), None, 0.0)
            manager.fork(parent, child)
            child.num_computed_tokens = parent.num_computed_tokens
            for token in parent.output_token_ids:
                child.append_output_token(token)
            requests[child.request_id] = child
        elif action < 0.85:
            request = requests[rng.choice(sorted(requests))]
            request.append_output_token(rng.randrange(100))
            if manager.allocate_slots(request, 1) is not None:
                request.num_computed_tokens += 1
                manager.cache_full_blocks(request)
        else:
            manager.free(requests.pop(rng.choice(sorted(requests))))
        manager.check_invariants()
    rows = [manager.table_array.row_of(rid) for rid in requests]
    assert len(set(rows)) == len(rows)
    for rid in requests:
        table = manager.block_ids(rid)
        row = manager.table_array.array[manager.table_array.row_of(rid)]
        assert np.array_equal(row[: len(table)], table)
