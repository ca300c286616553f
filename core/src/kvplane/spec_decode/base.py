"""The proposer interface: what drafts tokens for speculative decoding."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

from kvplane.scheduler.request import Request


class Proposer(ABC):
    """Drafts the tokens that likely follow each request's tokens.

    Called by :class:`~kvplane.spec_decode.decoder.SpecDecoder` on the engine's thread,
    between steps, for running requests whose last token is known but not computed yet.
    A proposer must be deterministic (the same tokens give the same drafts): the
    verification treats its proposal as a one-hot distribution
    (:mod:`kvplane.spec_decode.verification`).
    """

    #: vLLM's name of the method (``speculative_config["method"]``), the metrics' label.
    method: ClassVar[str]

    @abstractmethod
    def propose(
        self, requests: Sequence[Request], max_num_tokens: Sequence[int]
    ) -> list[list[int]]:
        """Per request, at most ``max_num_tokens[i]`` (>= 1) draft tokens to follow
        ``requests[i].all_token_ids``; an empty list drafts nothing. Must not modify the
        requests."""

    def take_kv_blocks(self, num_blocks: int, target_bytes_per_block: int) -> int:
        """Allocate the proposer's own KV cache out of the bytes of ``num_blocks`` target
        blocks (``target_bytes_per_block`` each); return the target's blocks left. Called
        once at start-up; by default the proposer has no cache and takes nothing."""
        return num_blocks

    def remove_request(self, request_id: str) -> None:  # noqa: B027 - optional hook
        """Forget what is kept for a finished request (the draft model's KV blocks).
        Nothing by default."""
