"""Scheduler policy: budgets, chunked prefill, preemption, aborts, forks, validation."""

from __future__ import annotations

import pytest

from kvplane.kv_cache import BlockManager
from kvplane.scheduler import (
    Request,
    RequestStatus,
    Scheduler,
    SchedulerConfig,
    SchedulerOutput,
)


def make_scheduler(
    num_blocks: int = 32,
    block_size: int = 4,
    max_num_seqs: int = 8,
    max_num_batched_tokens: int = 64,
    max_model_len: int = 64,
    enable_prefix_caching: bool = True,
) -> Scheduler:
    config = SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=max_model_len,
        enable_prefix_caching=enable_prefix_caching,
        block_size=block_size,
    )
    return Scheduler(config, BlockManager(num_blocks, block_size, enable_prefix_caching))


def make_request(
    request_id: str, num_tokens: int, arrival: float = 0.0, priority: int = 0, first: int = 0
) -> Request:
    return Request(request_id, list(range(first, first + num_tokens)), None, arrival, priority)


def step(scheduler: Scheduler, token: int = 0) -> SchedulerOutput:
    """schedule() + a fake model sampling ``token`` for everything that samples."""
    output = scheduler.schedule()
    scheduler.block_manager.check_invariants()
    sampled = {s.request.request_id: token for s in output.scheduled if s.is_sampling}
    sampled.update({f.child.request_id: token for f in output.forked})
    scheduler.update_from_output(output, sampled)
    scheduler.block_manager.check_invariants()
    return output


def plan(output: SchedulerOutput) -> dict[str, int]:
    return {s.request.request_id: s.num_new_tokens for s in output.scheduled}


def test_token_budget_and_chunked_prefill() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=8)
    scheduler.add_request(make_request("a", 10, arrival=0))
    scheduler.add_request(make_request("b", 10, arrival=1, first=100))
    out = step(scheduler)
    assert plan(out) == {"a": 8} and out.num_batched_tokens == 8
    assert not out.scheduled[0].is_sampling
    out = step(scheduler)
    assert plan(out) == {"a": 2, "b": 6}
    assert [s.is_sampling for s in out.scheduled] == [True, False]
    assert [s.start_position for s in out.scheduled] == [8, 0]
    assert plan(step(scheduler)) == {"a": 1, "b": 4}
    assert plan(step(scheduler)) == {"a": 1, "b": 1}
    assert scheduler.get_request("a").output_token_ids == [0, 0, 0]  # type: ignore[union-attr]


def test_max_num_seqs() -> None:
    scheduler = make_scheduler(max_num_seqs=2)
    for i in range(3):
        scheduler.add_request(make_request(f"r{i}", 3, arrival=i))
    assert plan(step(scheduler)) == {"r0": 3, "r1": 3}
    assert (scheduler.num_running, scheduler.num_waiting) == (2, 1)
    assert scheduler.finish_request("r0", RequestStatus.FINISHED_STOPPED)
    assert plan(step(scheduler)) == {"r1": 1, "r2": 3}


def test_long_prompt_is_chunked_alongside_decodes() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=6)
    scheduler.add_request(make_request("short", 2))
    step(scheduler)
    scheduler.add_request(make_request("long", 20, arrival=1))
    starts = []
    for _ in range(4):
        out = step(scheduler)
        assert plan(out) == {"short": 1, "long": 5}
        long = out.scheduled[1]
        starts.append((long.start_position, long.is_sampling))
        assert out.scheduled[0].is_sampling
    assert starts == [(0, False), (5, False), (10, False), (15, True)]
    assert plan(step(scheduler)) == {"short": 1, "long": 1}


def test_running_requests_come_before_waiting_ones() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=4)
    scheduler.add_request(make_request("a", 10, priority=5))
    step(scheduler)
    scheduler.add_request(make_request("b", 3, arrival=1, priority=0))  # more urgent
    assert plan(step(scheduler)) == {"a": 4}
    assert scheduler.get_request("b").status is RequestStatus.WAITING  # type: ignore[union-attr]
    assert plan(step(scheduler)) == {"a": 2, "b": 2}


def test_waiting_requests_are_admitted_by_priority_then_arrival() -> None:
    scheduler = make_scheduler(max_num_seqs=1)
    scheduler.add_request(make_request("late-low", 2, arrival=0, priority=1))
    scheduler.add_request(make_request("b", 2, arrival=2, priority=0))
    scheduler.add_request(make_request("a", 2, arrival=1, priority=0))
    order = []
    while scheduler.has_unfinished_requests():
        (scheduled,) = step(scheduler).scheduled
        order.append(scheduled.request.request_id)
        scheduler.finish_request(order[-1], RequestStatus.FINISHED_LENGTH)
    assert order == ["a", "b", "late-low"]


def preemption_setup(priorities: tuple[int, int, int], num_blocks: int = 6) -> Scheduler:
    """Three 7-token requests filling 6 blocks of 4; the third step needs 3 new blocks."""
    scheduler = make_scheduler(num_blocks=num_blocks, max_model_len=24)
    for i, priority in enumerate(priorities):
        scheduler.add_request(make_request(f"r{i}", 7, arrival=i, priority=priority, first=10 * i))
    assert plan(step(scheduler)) == {"r0": 7, "r1": 7, "r2": 7}
    step(scheduler)  # position 7: still in the second block
    return scheduler


@pytest.mark.parametrize(
    ("priorities", "victim"),
    [((0, 0, 0), "r2"), ((0, 1, 0), "r1"), ((2, 1, 1), "r0"), ((1, 1, 0), "r1")],
)
def test_preemption_picks_lowest_priority_then_latest_arrival(
    priorities: tuple[int, int, int], victim: str
) -> None:
    scheduler = preemption_setup(priorities)
    out = step(scheduler)
    assert out.preempted_request_ids == (victim,)
    assert set(plan(out)) == {"r0", "r1", "r2"} - {victim}
    preempted = scheduler.get_request(victim)
    assert preempted is not None
    assert preempted.status is RequestStatus.PREEMPTED
    assert (preempted.num_computed_tokens, preempted.num_preemptions) == (0, 1)
    assert scheduler.block_manager.block_ids(victim) == []
    assert scheduler.stats().num_preemptions_total == 1
    assert (scheduler.num_running, scheduler.num_waiting) == (2, 1)


def test_preempted_request_resumes_from_the_prefix_cache() -> None:
    scheduler = preemption_setup((0, 0, 0), num_blocks=7)
    assert step(scheduler).preempted_request_ids == ("r2",)
    r2 = scheduler.get_request("r2")
    assert r2 is not None and r2.num_tokens == 9
    scheduler.finish_request("r0", RequestStatus.FINISHED_STOPPED)
    out = step(scheduler)
    (resumed,) = [s for s in out.scheduled if s.request is r2]
    # r1 took (evicting) r2's second block; its first block was still cached.
    assert (resumed.start_position, resumed.num_new_tokens, resumed.is_sampling) == (4, 5, True)
    assert r2.status is RequestStatus.RUNNING and r2.num_tokens == 10
    assert r2.num_cached_tokens == 0  # counted on the first schedule only


def test_request_can_preempt_itself() -> None:
    scheduler = make_scheduler(num_blocks=5, max_model_len=20)
    scheduler.add_request(make_request("a", 6, arrival=0))
    scheduler.add_request(make_request("b", 2, arrival=1, first=50))
    scheduler.add_request(make_request("c", 8, arrival=2, first=100))
    step(scheduler)  # 2 + 1 + 2 blocks
    out = step(scheduler)  # c needs a third block and comes last: it gives way itself
    assert out.preempted_request_ids == ("c",)
    assert plan(out) == {"a": 1, "b": 1}


def test_preempted_request_waits_at_the_front_and_blocks_later_ones() -> None:
    scheduler = make_scheduler(num_blocks=6, max_model_len=24, max_num_seqs=3)
    for i in range(3):
        scheduler.add_request(make_request(f"r{i}", 7, arrival=i, first=10 * i))
    step(scheduler)
    step(scheduler)
    scheduler.add_request(make_request("early", 2, arrival=-1.0, first=90))
    assert step(scheduler).preempted_request_ids == ("r2",)
    scheduler.finish_request("r0", RequestStatus.FINISHED_STOPPED)
    out = step(scheduler)
    assert "r2" in plan(out)  # before "early", which arrived earlier but never ran
    assert "early" not in plan(out)  # no seat left


def test_nothing_is_admitted_in_a_step_that_preempted() -> None:
    scheduler = preemption_setup((0, 0, 1), num_blocks=7)
    scheduler.add_request(make_request("early", 2, arrival=-1.0, first=90))
    out = step(scheduler)
    assert out.preempted_request_ids == ("r2",)
    assert scheduler.block_manager.num_free_blocks == 1  # "early" would fit
    assert "early" not in plan(out)
    assert plan(step(scheduler)) == {"r0": 1, "r1": 1, "early": 2}


def test_abort_frees_blocks_at_once_in_every_state() -> None:
    scheduler = make_scheduler(num_blocks=6, max_model_len=24, max_num_seqs=8)
    bm = scheduler.block_manager
    for i in range(3):
        scheduler.add_request(make_request(f"r{i}", 7, arrival=i, first=10 * i))
    parent = make_request("parent", 3, arrival=5, first=70)
    child = make_request("child", 3, arrival=5, first=70)
    scheduler.add_request(parent, [child])
    scheduler.add_request(make_request("waiting", 3, arrival=6, first=80))
    step(scheduler)
    step(scheduler)
    assert step(scheduler).preempted_request_ids == ("r2",)

    assert bm.num_free_blocks == 0
    assert scheduler.abort_request("r0")  # running
    assert bm.num_free_blocks == 3 and bm.block_ids("r0") == []
    assert scheduler.abort_request("r2")  # preempted
    assert scheduler.abort_request("waiting")  # waiting, never ran
    assert scheduler.abort_request("child")  # waiting to be forked
    assert scheduler.get_request("child") is None
    assert not scheduler.abort_request("child")  # already gone
    assert not scheduler.abort_request("nope")
    out = step(scheduler)
    assert plan(out) == {"r1": 1, "parent": 3} and out.forked == ()
    assert scheduler.abort_request("parent")
    assert scheduler.abort_request("r1")
    assert bm.num_free_blocks == 6 and not scheduler.has_unfinished_requests()
    bm.check_invariants()


def test_abort_of_a_forked_child_frees_only_its_references() -> None:
    scheduler = make_scheduler()
    bm = scheduler.block_manager
    scheduler.add_request(make_request("p", 6), [make_request("c", 6)])
    out = step(scheduler)
    assert [f.child.request_id for f in out.forked] == ["c"]
    shared = bm.block_ids("p")
    assert [bm.pool.blocks[b].ref_count for b in shared] == [2, 2]
    assert scheduler.abort_request("c")
    assert [bm.pool.blocks[b].ref_count for b in shared] == [1, 1]
    assert plan(step(scheduler)) == {"p": 1}


def test_parallel_sampling_forks_children_in_the_parent_sampling_step() -> None:
    scheduler = make_scheduler(max_num_seqs=3, max_num_batched_tokens=4)
    bm = scheduler.block_manager
    parent = make_request("p", 6)
    children = [make_request("c1", 6), make_request("c2", 6)]
    scheduler.add_request(parent, children)
    scheduler.add_request(make_request("other", 2, arrival=1))
    assert scheduler.num_waiting == 4

    out = step(scheduler)
    assert plan(out) == {"p": 4} and out.forked == ()  # not sampling yet
    assert all(c.status is RequestStatus.WAITING for c in children)
    assert scheduler.num_running == 1  # "other" gets no seat: the family holds all three

    output = scheduler.schedule()
    assert plan(output) == {"p": 2} and output.scheduled[0].is_sampling
    assert [(f.child.request_id, f.parent_id) for f in output.forked] == [("c1", "p"), ("c2", "p")]
    shared = bm.block_ids("p")
    for child in children:
        assert child.status is RequestStatus.RUNNING
        assert child.num_computed_tokens == 6 and child.parent_id == "p"
        assert bm.block_ids(child.request_id) == shared
    assert [bm.pool.blocks[b].ref_count for b in shared] == [3, 3]
    scheduler.update_from_output(output, {"p": 10, "c1": 11, "c2": 12})
    assert [r.output_token_ids for r in (parent, *children)] == [[10], [11], [12]]

    out = step(scheduler)
    assert plan(out) == {"p": 1, "c1": 1, "c2": 1}
    # Position 6 is in the shared second block: the first two writers copy it.
    new_blocks = [bm.block_ids(r)[1] for r in ("p", "c1", "c2")]
    assert out.block_copies == ((shared[1], new_blocks[0]), (shared[1], new_blocks[1]))
    assert new_blocks[2] == shared[1]
    assert [bm.pool.blocks[b].ref_count for b in shared] == [3, 1]
    for s in out.scheduled:
        table = bm.block_ids(s.request.request_id)
        assert out.block_table[s.block_table_row, : s.num_blocks].tolist() == table


def test_children_become_ordinary_requests_if_the_parent_ends_before_forking() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=5)
    children = [make_request("c1", 10), make_request("c2", 10)]
    scheduler.add_request(make_request("p", 10), children)
    step(scheduler)  # 5 of 10 prompt tokens: one full block cached
    assert scheduler.abort_request("p")
    assert scheduler.num_waiting == 2
    out = step(scheduler)
    assert out.forked == ()
    assert [(s.request.request_id, s.start_position) for s in out.scheduled] == [("c1", 4)]
    assert children[0].num_cached_tokens == 4 and children[0].parent_id == "p"


def test_child_forked_and_preempted_in_the_same_step_is_unforked() -> None:
    scheduler = make_scheduler(num_blocks=3, max_num_batched_tokens=5, max_model_len=12)
    scheduler.add_request(make_request("q", 3, priority=1, first=50))
    step(scheduler)
    child = Request("c", list(range(8)), None, 0.0, priority=5)
    scheduler.add_request(make_request("p", 8, priority=0), [child])
    assert plan(step(scheduler)) == {"q": 1, "p": 4}
    out = scheduler.schedule()
    # p samples and forks c; q then needs a block: c (last in order) and q give way.
    assert plan(out) == {"p": 4}
    assert out.preempted_request_ids == ("c", "q")
    assert out.forked == ()
    assert child.status is RequestStatus.PREEMPTED and child.num_computed_tokens == 0
    assert scheduler.block_manager.block_ids("c") == []
    scheduler.update_from_output(out, {"p": 1})
    assert child.output_token_ids == []


def test_prefix_cache_hit_sets_cached_tokens_and_stats() -> None:
    scheduler = make_scheduler()
    scheduler.add_request(make_request("a", 10))
    step(scheduler)
    scheduler.add_request(make_request("b", 9, arrival=1))
    out = step(scheduler)
    (b,) = [s for s in out.scheduled if s.request.request_id == "b"]
    assert (b.start_position, b.num_new_tokens, b.request.num_cached_tokens) == (8, 1, 8)
    stats = scheduler.stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (19, 8)
    assert stats.prefix_cache_hit_rate == pytest.approx(8 / 19)
    assert (stats.num_running, stats.num_waiting) == (2, 0)
    assert stats.kv_cache_usage == pytest.approx(4 / 32)  # 3 blocks of a, 1 more for b


def test_update_from_output_validation_and_late_aborts() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=4)
    scheduler.add_request(make_request("a", 6))
    scheduler.add_request(make_request("b", 2, arrival=1))
    out = scheduler.schedule()
    with pytest.raises(ValueError, match="not sampling"):
        scheduler.update_from_output(out, {"a": 1})
    scheduler.update_from_output(out, {})
    with pytest.raises(ValueError, match="stale"):
        scheduler.update_from_output(out, {})
    out = scheduler.schedule()
    assert plan(out) == {"a": 2, "b": 2}
    scheduler.abort_request("a")  # after the model ran, before the update
    scheduler.update_from_output(out, {"a": 5, "b": 6})
    assert scheduler.get_request("b").output_token_ids == [6]  # type: ignore[union-attr]
    scheduler.block_manager.check_invariants()


def test_empty_schedule() -> None:
    scheduler = make_scheduler()
    out = scheduler.schedule()
    assert out.is_empty and out.num_batched_tokens == 0
    assert not scheduler.has_unfinished_requests()


def test_add_request_validation() -> None:
    scheduler = make_scheduler(max_num_seqs=3, max_model_len=16)
    with pytest.raises(ValueError, match="empty prompt"):
        scheduler.add_request(make_request("e", 0))
    with pytest.raises(ValueError, match="max_model_len"):
        scheduler.add_request(make_request("long", 17))
    scheduler.add_request(make_request("a", 16))
    with pytest.raises(ValueError, match="already in use"):
        scheduler.add_request(make_request("a", 2))
    with pytest.raises(ValueError, match="max_num_seqs"):
        scheduler.add_request(make_request("p", 2), [make_request(f"c{i}", 2) for i in range(3)])
    with pytest.raises(ValueError, match="repeat its parent's prompt"):
        scheduler.add_request(make_request("p", 2), [make_request("c", 2, first=1)])
    with pytest.raises(ValueError, match="repeated"):
        scheduler.add_request(make_request("p", 2), [make_request("c", 2), make_request("c", 2)])
    with pytest.raises(ValueError, match="already in use"):
        scheduler.add_request(make_request("p", 2), [make_request("a", 2)])
    salted = Request("c", [0, 1], None, 0.0, cache_salt="x")
    with pytest.raises(ValueError, match="cache_salt"):
        scheduler.add_request(make_request("p", 2), [salted])
    stale = make_request("s", 2)
    stale.num_computed_tokens = 1
    with pytest.raises(ValueError, match="not fresh"):
        scheduler.add_request(stale)
    with pytest.raises(ValueError, match="FINISHED"):
        scheduler.finish_request("a", RequestStatus.RUNNING)
    assert scheduler.num_waiting == 1  # failed adds leave nothing behind


def test_constructor_validation() -> None:
    config = SchedulerConfig(max_model_len=65, block_size=4)
    with pytest.raises(ValueError, match="KV cache capacity"):
        Scheduler(config, BlockManager(16, 4))
    with pytest.raises(ValueError, match="block_size"):
        Scheduler(SchedulerConfig(max_model_len=64, block_size=4), BlockManager(32, 8))
    with pytest.raises(ValueError, match="prefix caching"):
        Scheduler(SchedulerConfig(max_model_len=64, block_size=4), BlockManager(16, 4, False))
