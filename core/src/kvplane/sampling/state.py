"""What the sampler reads of one sequence across steps: its params, tokens, generator and
constraint hooks. Owned by the engine (one per sequence), read by
:class:`~kvplane.sampling.sampler.Sampler`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from kvplane.sampling.params import SamplingParams

#: ``(output_token_ids, logits [vocab_size] float32) -> logits [vocab_size]``; may modify
#: and return its argument. Applied row by row: prefer ``allowed_mask_fn`` when possible.
LogitsProcessor = Callable[[Sequence[int], torch.Tensor], torch.Tensor]

#: ``(output_token_ids) -> mask of tokens allowed now, or None (no constraint this step)``.
#: The mask is either a ``[vocab_size]`` bool tensor or a packed ``[ceil(vocab_size / 32)]``
#: int32 bitmask (bit ``j`` of word ``i`` allows token ``32 * i + j``; what xgrammar fills),
#: on the CPU or the logits' device. The sampler stacks the masks of all rows, moves them to
#: the device at once (packed: 32x fewer bytes) and applies them in one batched kernel: the
#: seam for grammar-constrained decoding (see :mod:`kvplane.structured`). Called once per
#: sampling step of the row, so it may advance its own state by the tokens appended since.
AllowedMaskFn = Callable[[Sequence[int]], torch.Tensor | None]


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A generator on ``device`` seeded with ``seed``, for a request's own noise."""
    generator = torch.Generator(device=torch.device(device))
    generator.manual_seed(seed)
    return generator


@dataclass(eq=False)
class SequenceSamplingState:
    """Sampling state of one sequence, owned by the engine and living across steps.

    ``output_token_ids`` is the engine's live list: the scheduler appends each accepted
    token; the sampler only reads it (append-only between calls, see
    :class:`~kvplane.sampling.penalties.PenaltyCache`). ``generator`` is created lazily on
    the logits' device from ``params.seed`` when left ``None``; the sampler advances it by
    one ``[vocab_size]`` draw per random step. Compared by identity: the sampler caches
    per-sequence penalty statistics under it until the object is garbage-collected.
    """

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    eos_token_ids: frozenset[int] = frozenset()
    generator: torch.Generator | None = None
    #: Extra per-row logits transforms, applied after ``allowed_mask_fn``.
    logits_processors: list[LogitsProcessor] = field(default_factory=list)
    #: Batched token constraint (grammar); see :data:`AllowedMaskFn`.
    allowed_mask_fn: AllowedMaskFn | None = None

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)


__all__ = ["AllowedMaskFn", "LogitsProcessor", "SequenceSamplingState", "make_generator"]
