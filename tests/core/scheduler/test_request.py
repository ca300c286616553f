"""Request state."""

from __future__ import annotations

from kvplane.scheduler import Request, RequestStatus


def test_token_lists_and_counts() -> None:
    prompt = [1, 2, 3]
    request = Request("r", prompt, None, arrival_time=1.5)
    prompt.append(99)  # the request keeps its own copy
    assert request.all_token_ids == [1, 2, 3]
    request.append_output_token(7)
    request.append_output_token(8)
    assert request.output_token_ids == [7, 8]
    assert request.all_token_ids == [1, 2, 3, 7, 8]
    assert (request.num_tokens, request.num_prompt_tokens, request.num_output_tokens) == (5, 3, 2)
    assert request.priority == 0 and request.num_computed_tokens == 0
    assert request.status is RequestStatus.WAITING and not request.is_finished


def test_outputs_given_at_construction_are_part_of_all_tokens() -> None:
    request = Request("r", [1], None, 0.0, output_token_ids=[2, 3])
    assert request.all_token_ids == [1, 2, 3]


def test_status_is_finished() -> None:
    finished = {s for s in RequestStatus if s.is_finished}
    assert finished == {
        RequestStatus.FINISHED_STOPPED,
        RequestStatus.FINISHED_LENGTH,
        RequestStatus.FINISHED_ABORTED,
        RequestStatus.FINISHED_ERROR,
    }
    request = Request("r", [1], None, 0.0)
    request.status = RequestStatus.FINISHED_ABORTED
    assert request.is_finished


def test_requests_compare_by_identity() -> None:
    a = Request("r", [1], None, 0.0)
    b = Request("r", [1], None, 0.0)
    assert a != b and a == a
    assert len({a, b}) == 2
