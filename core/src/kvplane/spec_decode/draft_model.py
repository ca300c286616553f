"""The ``draft_model`` proposer: a smaller model with the same tokenizer drafts greedily.

It runs on the target's platform and device through a :class:`ModelRunner` of its own,
with its own paged KV cache and :class:`BlockManager` (no prefix caching). Per request it
keeps the KV of the tokens it has computed; a proposal first catches up on the tokens
the target has added since (the whole prompt the first time), samples the first draft,
then one token per further draft. Its KV of rejected drafts is simply recomputed later:
only the prefix that matches the request's tokens counts as computed.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from kvplane.config import EngineConfig
from kvplane.engine.model_runner import ModelRunner
from kvplane.kv_cache.block_manager import BlockManager
from kvplane.models.config import ModelConfig, resolve_model_config
from kvplane.models.layers.context import BuildContext
from kvplane.models.loader import build_model
from kvplane.quantization.config import resolve_quant_config
from kvplane.sampling.params import SamplingParams
from kvplane.sampling.sampler import Sampler, SequenceSamplingState
from kvplane.scheduler.output import ScheduledRequest, SchedulerOutput
from kvplane.scheduler.request import Request
from kvplane.spec_decode.base import Proposer
from kvplane.spec_decode.config import SpeculativeConfig

logger = logging.getLogger(__name__)

#: The draft samples greedily: a deterministic proposal (see ``verification.py``).
_GREEDY = SequenceSamplingState(
    params=SamplingParams(temperature=0.0, detokenize=False),
    prompt_token_ids=[],
    output_token_ids=[],
)


@dataclass(slots=True)
class _DraftState:
    """What the draft's KV cache holds for one request: its tokens up to ``num_computed``,
    of which those from ``anchor`` on were the drafts ``draft_token_ids``; ``shadow`` is
    the request as the draft's block manager knows it."""

    shadow: Request
    num_computed: int
    anchor: int
    draft_token_ids: tuple[int, ...]

    def num_valid(self, token_ids: Sequence[int]) -> int:
        """Positions whose KV is still the request's: up to the first rejected draft."""
        num_kept = 0
        for offset, draft in enumerate(self.draft_token_ids):
            position = self.anchor + offset
            if position >= len(token_ids) or token_ids[position] != draft:
                break
            num_kept += 1
        return min(self.num_computed, self.anchor + num_kept)


class DraftModelProposer(Proposer):
    """Greedy drafts from ``runner``'s model; the KV cache is bound by
    :meth:`take_kv_blocks`. The engine's thread only."""

    method = "draft_model"

    def __init__(
        self,
        runner: ModelRunner,
        num_speculative_tokens: int,
        max_model_len: int,
        target_vocab_size: int,
    ) -> None:
        self.runner = runner
        self.num_speculative_tokens = num_speculative_tokens
        self.max_model_len = max_model_len
        self.target_vocab_size = target_vocab_size
        self.block_manager: BlockManager | None = None
        self._states: dict[str, _DraftState] = {}

    @classmethod
    def load(
        cls,
        spec_config: SpeculativeConfig,
        config: EngineConfig,
        target: ModelConfig,
        ctx: BuildContext,
    ) -> DraftModelProposer:
        """Load ``spec_config.model`` on the target's platform, device and dtype rule."""
        draft_engine_config = dataclasses.replace(
            config,
            model=spec_config.model,
            max_model_len=None,
            quantization=None,
            speculative_config=None,
        )
        draft = resolve_model_config(draft_engine_config, ctx.platform)
        draft_ctx = dataclasses.replace(
            ctx,
            dtype=draft.dtype,
            quantization=resolve_quant_config(None, draft.hf_config, is_gguf=draft.source.is_gguf),
        )
        model = build_model(draft.hf_config, draft_ctx, draft.source, config.load_format)
        vocab_size = draft.hf_config.vocab_size
        if vocab_size != target.hf_config.vocab_size:
            logger.warning(
                "draft model vocabulary (%d) differs from the target's (%d): they must "
                "share a tokenizer",
                vocab_size,
                target.hf_config.vocab_size,
            )
        runner = ModelRunner(
            model,
            ctx.platform,
            ctx.device,
            ctx.block_size,
            Sampler(ctx.platform.ops, vocab_size),
            config.seed,
        )
        logger.info(
            "draft model %s (%s), %d speculative tokens",
            draft.source.display_name,
            draft.architecture,
            spec_config.num_speculative_tokens,
        )
        return cls(
            runner,
            spec_config.num_speculative_tokens,
            min(draft.max_model_len, target.max_model_len),
            target.hf_config.vocab_size,
        )

    def take_kv_blocks(self, num_blocks: int, target_bytes_per_block: int) -> int:
        """Split the bytes of ``num_blocks`` target blocks so both caches hold the same
        number of tokens; bind the draft's share."""
        draft_bytes = self.runner.bytes_per_block()
        num_shared = num_blocks * target_bytes_per_block // (target_bytes_per_block + draft_bytes)
        self.runner.initialize_kv_cache(max(num_shared, 1))
        self.block_manager = BlockManager(
            max(num_shared, 1), self.runner.block_size, enable_prefix_caching=False
        )
        logger.info(
            "draft KV cache: %d blocks (%.1f MiB)",
            num_shared,
            num_shared * draft_bytes / 2**20,
        )
        return num_shared

    def remove_request(self, request_id: str) -> None:
        state = self._states.pop(request_id, None)
        if state is not None and self.block_manager is not None:
            self.block_manager.free(state.shadow)

    def propose(
        self, requests: Sequence[Request], max_num_tokens: Sequence[int]
    ) -> list[list[int]]:
        assert self.block_manager is not None, "take_kv_blocks binds the draft's KV cache"
        drafts: list[list[int]] = [[] for _ in requests]
        batch: list[tuple[int, Request, int]] = []  # (index, shadow, num drafts)
        for index, (request, limit) in enumerate(zip(requests, max_num_tokens, strict=True)):
            room = self.max_model_len - request.num_tokens + 1
            num_drafts = min(limit, self.num_speculative_tokens, room)
            if num_drafts <= 0:
                continue
            state = self._states.get(request.request_id)
            num_valid = 0 if state is None else state.num_valid(request.all_token_ids)
            shadow = Request(
                request.request_id,
                request.all_token_ids,
                None,
                request.arrival_time,
                num_computed_tokens=num_valid,
            )
            # Slots for the catch-up and every draft but the last (never computed here).
            num_slots = request.num_tokens - num_valid + num_drafts - 1
            if self.block_manager.allocate_slots(shadow, num_slots) is None:
                continue  # the draft's cache is full: no drafts for it this step
            batch.append((index, shadow, num_drafts))
        for step in range(max((n for _, _, n in batch), default=0)):
            active = [(i, s, n) for i, s, n in batch if n > step]
            sampled = self._run(active)
            for index, shadow, _ in active:
                token_id = sampled[shadow.request_id]
                drafts[index].append(token_id)
                shadow.num_computed_tokens = shadow.num_tokens
                shadow.append_output_token(token_id)
        for index, shadow, num_drafts in batch:
            request = requests[index]
            self._states[request.request_id] = _DraftState(
                shadow=shadow,
                num_computed=request.num_tokens + num_drafts - 1,
                anchor=request.num_tokens,
                draft_token_ids=tuple(drafts[index]),
            )
            drafts[index] = _in_vocabulary(drafts[index], self.target_vocab_size)
        return drafts

    def _run(self, active: list[tuple[int, Request, int]]) -> dict[str, int]:
        """One draft forward: each shadow's tokens from its computed ones (the catch-up at
        the first step, one token after), sampled greedily at its last."""
        assert self.block_manager is not None
        manager = self.block_manager
        scheduled = []
        for _, shadow, _ in active:
            start = shadow.num_computed_tokens
            scheduled.append(
                ScheduledRequest(
                    shadow,
                    shadow.num_tokens - start,
                    start,
                    manager.num_table_blocks(shadow.request_id),
                    True,
                    manager.table_array.row_of(shadow.request_id),
                )
            )
        output = SchedulerOutput(
            scheduled=tuple(scheduled),
            forked=(),
            block_copies=(),
            preempted_request_ids=(),
            num_batched_tokens=sum(s.num_new_tokens for s in scheduled),
            block_table=manager.table_array.array,
        )
        states = {shadow.request_id: _GREEDY for _, shadow, _ in active}
        return self.runner.execute(output, states).sampled_token_ids


def _in_vocabulary(token_ids: list[int], vocab_size: int) -> list[int]:
    """The drafts up to the first one the target's vocabulary lacks."""
    for index, token_id in enumerate(token_ids):
        if token_id >= vocab_size:
            return token_ids[:index]
    return token_ids
