"""The checks :meth:`Scheduler.add_request` runs on new requests and their children."""

from __future__ import annotations

from collections.abc import Container, Sequence

from kvplane.scheduler.request import Request, RequestStatus


def check_new(request: Request, known_ids: Container[str]) -> None:
    """``ValueError`` unless ``request`` is fresh and its id is not in ``known_ids``."""
    if request.request_id in known_ids:
        raise ValueError(f"request id {request.request_id!r} is already in use")
    if request.status is not RequestStatus.WAITING or request.num_computed_tokens != 0:
        raise ValueError(
            f"request {request.request_id!r} is not fresh (status={request.status.name}, "
            f"num_computed_tokens={request.num_computed_tokens})"
        )


def check_children(
    parent: Request, children: Sequence[Request], known_ids: Container[str], max_num_seqs: int
) -> None:
    """``ValueError`` unless ``children`` can be ``parent``'s parallel-sampling siblings:
    fresh, distinct, repeating its prompt and cache salt, a family of at most
    ``max_num_seqs``."""
    if 1 + len(children) > max_num_seqs:
        raise ValueError(
            f"request {parent.request_id!r} asks for {1 + len(children)} sequences, "
            f"more than max_num_seqs={max_num_seqs}"
        )
    if parent.output_token_ids:
        raise ValueError(f"request {parent.request_id!r} with children has outputs already")
    ids = {parent.request_id}
    for child in children:
        check_new(child, known_ids)
        if child.request_id in ids:
            raise ValueError(f"request id {child.request_id!r} is repeated")
        ids.add(child.request_id)
        if child.all_token_ids != parent.prompt_token_ids:
            raise ValueError(f"child {child.request_id!r} must repeat its parent's prompt")
        if child.cache_salt != parent.cache_salt:
            raise ValueError(f"child {child.request_id!r} must share its parent's cache_salt")
        if child.parent_id not in (None, parent.request_id):
            raise ValueError(f"child {child.request_id!r} names another parent")
