"""Scheduler limits."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True, kw_only=True)
class SchedulerConfig:
    """Per-step limits and KV-cache options of the :class:`Scheduler` (keyword-only).

    ``max_num_seqs`` bounds the running requests (and so the requests of one step);
    ``max_num_batched_tokens`` bounds the new tokens of one step, prompts being chunked
    to fit; ``max_model_len`` bounds prompt plus output tokens of one request.
    """

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int
    enable_prefix_caching: bool = True
    block_size: int = 16

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"SchedulerConfig.{name} must be a positive int, got {value!r}")
