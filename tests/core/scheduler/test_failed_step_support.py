"""What the engine needs of the scheduler to undo a failed step and isolate its requests:
``requeue``, ``schedule(is_eligible)`` and ``Request.drop_placeholders``."""

from __future__ import annotations

from kvplane.scheduler import RequestStatus
from kvplane.scheduler.request import PLACEHOLDER_TOKEN_ID
from tests.core.scheduler.test_scheduler import make_request, make_scheduler, plan, step


def test_requeue_frees_blocks_and_recomputes_first() -> None:
    scheduler = make_scheduler(enable_prefix_caching=False)
    a, b = make_request("a", 6), make_request("b", 6, arrival=1, first=50)
    scheduler.add_request(a)
    scheduler.add_request(b)
    step(scheduler)
    free_before = scheduler.block_manager.num_free_blocks
    scheduler.requeue("a")
    scheduler.requeue("missing")  # unknown ids are ignored
    assert a.status is RequestStatus.PREEMPTED and a.num_computed_tokens == 0
    assert scheduler.block_manager.num_free_blocks > free_before
    scheduler.block_manager.check_invariants()
    assert plan(step(scheduler)) == {"b": 1, "a": 7}  # prompt and its sampled token


def test_is_eligible_limits_the_step_and_skips_waiting_requests() -> None:
    scheduler = make_scheduler()
    for index, name in enumerate("abc"):
        scheduler.add_request(make_request(name, 4, arrival=index, first=10 * index))
    only_b = scheduler.schedule(lambda request: request.request_id == "b")
    assert plan(only_b) == {"b": 4}
    scheduler.update_from_output(only_b, {"b": 1})
    assert plan(step(scheduler)) == {"b": 1, "a": 4, "c": 4}


def test_drop_placeholders_keeps_real_tokens() -> None:
    request = make_request("r", 3)
    request.append_output_token(7)
    request.append_output_token(PLACEHOLDER_TOKEN_ID)
    request.drop_placeholders()
    assert request.output_token_ids == [7] and request.all_token_ids == [0, 1, 2, 7]
    request.drop_placeholders()
    assert request.output_token_ids == [7]
