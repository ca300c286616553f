"""Draft tokens in the scheduler: budgeted with the request, only accepted ones computed,
blocks of rejected ones released, drafts dropped by preemption."""

from __future__ import annotations

from kvplane.scheduler import RequestStatus

from .test_scheduler import make_request, make_scheduler, step


def test_drafts_ride_along_and_rejected_ones_release_their_blocks() -> None:
    scheduler = make_scheduler(block_size=4)
    request = make_request("a", 6)
    scheduler.add_request(request)
    step(scheduler, token=100)  # prefill: 6 prompt tokens, samples one
    assert request.num_tokens == 7 and request.num_computed_tokens == 6
    request.spec_token_ids[:] = [101, 102, 103, 104]
    output = scheduler.schedule()
    (scheduled,) = output.scheduled
    assert scheduled.num_new_tokens == 5 and scheduled.spec_token_ids == (101, 102, 103, 104)
    assert scheduled.is_sampling and request.spec_token_ids == []  # taken
    assert output.num_batched_tokens == 5
    manager = scheduler.block_manager
    assert manager.num_table_blocks("a") == 3  # positions 0..10
    # Two drafts accepted, the third rejected in favour of 200.
    scheduler.update_from_output(output, {"a": 200}, {"a": (101, 102)})
    manager.check_invariants()
    assert request.output_token_ids == [100, 101, 102, 200]
    assert request.num_computed_tokens == 9 and request.num_tokens == 10
    assert manager.num_table_blocks("a") == 3  # positions 0..9 still need 3 blocks
    request.spec_token_ids[:] = [1, 2, 3, 4, 5, 6]
    output = scheduler.schedule()
    assert manager.num_table_blocks("a") == 4
    scheduler.update_from_output(output, {"a": 7}, {"a": ()})  # all rejected
    manager.check_invariants()
    assert request.num_computed_tokens == 10 and request.num_tokens == 11
    assert manager.num_table_blocks("a") == 3  # the block only drafts used is free again
    assert manager.num_free_blocks == manager.num_blocks - 3


def test_the_budget_truncates_drafts_first() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=3)
    request = make_request("a", 3)
    scheduler.add_request(request)
    step(scheduler)
    request.spec_token_ids[:] = [5, 6, 7, 8]
    (scheduled,) = scheduler.schedule().scheduled
    assert scheduled.num_new_tokens == 3 and scheduled.spec_token_ids == (5, 6)


def test_full_blocks_enter_the_prefix_cache_only_with_accepted_tokens() -> None:
    scheduler = make_scheduler(block_size=4)
    request = make_request("a", 3)
    scheduler.add_request(request)
    step(scheduler, token=50)  # 4 tokens, 3 computed
    request.spec_token_ids[:] = [51, 52, 53, 54]
    output = scheduler.schedule()
    scheduler.update_from_output(output, {"a": 60}, {"a": (51,)})
    # Computed: 3 prompt + 50 + 51 = 5 tokens: only block 0 is full and cached.
    assert request.num_computed_tokens == 5
    scheduler.block_manager.check_invariants()
    assert scheduler.block_manager.pool.num_cached_blocks == 1


def test_preemption_drops_the_drafts() -> None:
    scheduler = make_scheduler()
    request = make_request("a", 3)
    scheduler.add_request(request)
    step(scheduler)
    request.spec_token_ids[:] = [1, 2]
    scheduler.requeue("a")
    assert request.status is RequestStatus.PREEMPTED and request.spec_token_ids == []
    output = scheduler.schedule()
    (scheduled,) = output.scheduled
    assert scheduled.spec_token_ids == () and scheduled.num_new_tokens == 4
