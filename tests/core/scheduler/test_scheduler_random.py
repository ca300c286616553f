"""Randomised engine simulation: scheduler + block manager against a fake model.

The fake model keeps a fake KV cache (one ``(token, position)`` per slot) that it writes
through the scheduled block tables and reads back to sample, so a wrong block table, a
missing copy-on-write or a bad prefix-cache hit changes the sampled tokens. Every
finished request must produce exactly what the same model gives when run alone.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import pytest

from kvplane.kv_cache import BlockManager
from kvplane.scheduler import (
    Request,
    RequestStatus,
    Scheduler,
    SchedulerConfig,
    SchedulerOutput,
)

VOCAB = 23  # small, so that outputs of different requests often coincide
MODULUS = (1 << 61) - 1


def next_token(seed: int, context: Sequence[int]) -> int:
    """The fake model: a deterministic function of the seed and all previous tokens."""
    h = seed
    for token in context:
        h = (h * 1_000_003 + token + 1) % MODULUS
    return h % VOCAB


def generate_alone(prompt: Sequence[int], seed: int, max_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(next_token(seed, tokens))
    return tokens[len(prompt) :]


@dataclass
class Counters:
    steps: int = 0
    preemptions: int = 0
    forks: int = 0
    copies: int = 0
    prefix_hit_tokens: int = 0
    aborts_waiting: int = 0
    aborts_running: int = 0
    aborts_child: int = 0
    aborts_in_flight: int = 0
    chunked_steps: int = 0


class FakeEngine:
    """Drives a scheduler like the real engine loop and checks every step."""

    def __init__(self, scheduler: Scheduler, rng: random.Random, counters: Counters) -> None:
        self.scheduler = scheduler
        self.bm = scheduler.block_manager
        self.rng = rng
        self.counters = counters
        self.block_size = self.bm.block_size
        # [num_blocks][block_size] -> (token, position) written there, or None
        self.kv: list[list[tuple[int, int] | None]] = [
            [None] * self.block_size for _ in range(self.bm.num_blocks)
        ]
        self.max_tokens: dict[str, int] = {}
        self.requests: dict[str, Request] = {}
        self.aborted: set[str] = set()

    def add(self, request: Request, max_tokens: int, children: Sequence[Request] = ()) -> None:
        self.scheduler.add_request(request, children)
        for r in (request, *children):
            self.max_tokens[r.request_id] = max_tokens
            self.requests[r.request_id] = r

    def abort(self, request_id: str) -> None:
        request = self.scheduler.get_request(request_id)
        assert request is not None
        if request.status is RequestStatus.RUNNING:
            self.counters.aborts_running += 1
        elif self.is_waiting_for_fork(request):
            self.counters.aborts_child += 1
        else:
            self.counters.aborts_waiting += 1
        assert self.scheduler.abort_request(request_id)
        assert self.bm.block_ids(request_id) == []
        assert request.status is RequestStatus.FINISHED_ABORTED
        self.aborted.add(request_id)

    def read_context(self, block_ids: Sequence[int], num_tokens: int) -> list[int]:
        context = []
        for pos in range(num_tokens):
            entry = self.kv[block_ids[pos // self.block_size]][pos % self.block_size]
            assert entry is not None and entry[1] == pos, f"slot of position {pos}: {entry}"
            context.append(entry[0])
        return context

    def check_output(self, output: SchedulerOutput) -> None:
        config = self.scheduler.config
        ids = [s.request.request_id for s in output.scheduled]
        assert len(ids) == len(set(ids))
        assert len(ids) <= config.max_num_seqs
        assert self.scheduler.num_running <= config.max_num_seqs
        total = sum(s.num_new_tokens for s in output.scheduled)
        assert total == output.num_batched_tokens <= config.max_num_batched_tokens
        for s in output.scheduled:
            request = s.request
            assert request.status is RequestStatus.RUNNING
            assert s.num_new_tokens >= 1
            assert s.start_position == request.num_computed_tokens
            end = s.start_position + s.num_new_tokens
            assert end <= request.num_tokens
            assert s.is_sampling == (end == request.num_tokens)
            table = self.bm.block_ids(request.request_id)
            assert s.num_blocks == len(table) and s.num_blocks * self.block_size >= end
            assert output.block_table[s.block_table_row, : s.num_blocks].tolist() == table
            if s.start_position > 0 and s.num_new_tokens < request.num_tokens - s.start_position:
                self.counters.chunked_steps += 1
        sampling_parents = {s.request.request_id for s in output.scheduled if s.is_sampling}
        for forked in output.forked:
            assert forked.parent_id in sampling_parents
            assert forked.child.status is RequestStatus.RUNNING
            assert forked.child.num_computed_tokens == forked.child.num_tokens

    def is_waiting_for_fork(self, request: Request) -> bool:
        return (
            request.parent_id is not None
            and request.status is RequestStatus.WAITING
            and self.scheduler.get_request(request.parent_id) is not None
        )

    def step(self) -> None:
        output = self.scheduler.schedule()
        self.bm.check_invariants()
        self.check_output(output)
        self.counters.steps += 1
        self.counters.preemptions += len(output.preempted_request_ids)
        self.counters.forks += len(output.forked)
        self.counters.copies += len(output.block_copies)

        # Copy-on-write: read every source before writing (like the reference hook).
        sources = [list(self.kv[src]) for src, _ in output.block_copies]
        for (_, dst), data in zip(output.block_copies, sources, strict=True):
            self.kv[dst] = data
        tables = {
            s.request.request_id: output.block_table[s.block_table_row, : s.num_blocks].tolist()
            for s in output.scheduled
        }
        for s in output.scheduled:
            tokens = s.request.all_token_ids
            table = tables[s.request.request_id]
            for pos in range(s.start_position, s.start_position + s.num_new_tokens):
                self.kv[table[pos // self.block_size]][pos % self.block_size] = (
                    tokens[pos],
                    pos,
                )
        sampled: dict[str, int] = {}
        contexts: dict[str, list[int]] = {}
        for s in output.scheduled:
            if s.is_sampling:
                context = self.read_context(tables[s.request.request_id], s.request.num_tokens)
                assert context == s.request.all_token_ids
                contexts[s.request.request_id] = context
                sampled[s.request.request_id] = next_token(s.request.sampling_params, context)
        for forked in output.forked:
            child = forked.child
            sampled[child.request_id] = next_token(
                child.sampling_params, contexts[forked.parent_id]
            )

        # Sometimes an abort lands after the model ran but before the update.
        if output.scheduled and self.rng.random() < 0.05:
            victim = self.rng.choice(output.scheduled).request
            if not victim.is_finished:
                self.counters.aborts_in_flight += 1
                self.abort(victim.request_id)

        self.scheduler.update_from_output(output, sampled)
        self.bm.check_invariants()
        for request_id in sampled:
            request = self.requests[request_id]
            if request.is_finished:
                continue
            if request.num_output_tokens >= self.max_tokens[request_id]:
                assert self.scheduler.finish_request(request_id, RequestStatus.FINISHED_LENGTH)
        self.bm.check_invariants()


def make_prompt(rng: random.Random, prefixes: list[list[int]]) -> list[int]:
    prefix = rng.choice(prefixes)[: rng.randint(0, 24)]
    suffix = [rng.randrange(VOCAB) for _ in range(rng.randint(0 if prefix else 1, 14))]
    return prefix + suffix


def simulate(seed: int, counters: Counters) -> None:
    rng = random.Random(seed)
    block_size = rng.choice([2, 4, 8])
    num_blocks = rng.randint(48 // block_size + 2, 96 // block_size)
    enable_prefix_caching = seed % 5 != 0
    config = SchedulerConfig(
        max_num_seqs=rng.randint(2, 8),
        max_num_batched_tokens=rng.randint(4, 40),
        max_model_len=48,
        enable_prefix_caching=enable_prefix_caching,
        block_size=block_size,
    )
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching)
    engine = FakeEngine(Scheduler(config, bm), rng, counters)
    prefixes = [[rng.randrange(VOCAB) for _ in range(24)] for _ in range(3)]

    num_arrivals = 60
    arrived = 0
    clock = 0.0
    while arrived < num_arrivals or engine.scheduler.has_unfinished_requests():
        assert counters.steps < 1_000_000
        clock += 1.0
        while arrived < num_arrivals and rng.random() < 0.5:
            arrived += 1
            prompt = make_prompt(rng, prefixes)
            max_tokens = rng.randint(1, config.max_model_len - len(prompt))
            max_tokens = min(max_tokens, 12)
            request_id = f"r{arrived}"
            arrival = clock + rng.choice([0.0, 0.5])
            priority = rng.randint(0, 2)
            request = Request(request_id, prompt, rng.randrange(1 << 30), arrival, priority)
            num_children = rng.choice([0, 0, 0, 0, 1, 2]) if config.max_num_seqs >= 3 else 0
            # Children usually share the parent's priority; a lower one (larger value) makes
            # them the first victims, sometimes in the very step that forks them.
            children = [
                Request(
                    f"{request_id}.{i}",
                    prompt,
                    rng.randrange(1 << 30),
                    arrival,
                    priority + rng.choice([0, 0, 3]),
                )
                for i in range(num_children)
            ]
            engine.add(request, max_tokens, children)
        unfinished = [r for r in engine.requests.values() if not r.is_finished]
        if unfinished and rng.random() < 0.04:
            engine.abort(rng.choice(unfinished).request_id)
        engine.step()

    stats = engine.scheduler.stats()
    counters.prefix_hit_tokens += stats.prefix_cache_hits
    assert stats.num_running == stats.num_waiting == 0
    assert stats.num_preemptions_total == sum(r.num_preemptions for r in engine.requests.values())
    assert bm.num_free_blocks == bm.num_blocks
    assert all(block.ref_count == 0 for block in bm.pool.blocks)
    assert bm.usage == 0.0
    for request_id, request in engine.requests.items():
        if request_id in engine.aborted:
            assert request.status is RequestStatus.FINISHED_ABORTED
            continue
        assert request.status is RequestStatus.FINISHED_LENGTH
        expected = generate_alone(
            request.prompt_token_ids, request.sampling_params, engine.max_tokens[request_id]
        )
        assert request.output_token_ids == expected, request_id


def test_random_engine_simulation() -> None:
    counters = Counters()
    for seed in range(40):
        simulate(seed, counters)
    # The simulation must actually exercise the interesting paths.
    assert counters.preemptions > 0
    assert counters.forks > 0
    assert counters.copies > 0
    assert counters.prefix_hit_tokens > 0
    assert counters.chunked_steps > 0
    assert counters.aborts_waiting > 0
    assert counters.aborts_running > 0
    assert counters.aborts_child > 0
    assert counters.aborts_in_flight > 0


def test_fake_model_detects_skipped_copy_on_write(monkeypatch: pytest.MonkeyPatch) -> None:
    """The harness itself can fail: drop the copies and forked children read garbage."""
    original = BlockManager.allocate_slots

    def allocate_without_copies(self: BlockManager, *args, **kwargs):  # type: ignore[no-untyped-def]
        copies = original(self, *args, **kwargs)
        return None if copies is None else []

    monkeypatch.setattr(BlockManager, "allocate_slots", allocate_without_copies)
    with pytest.raises(AssertionError):
        for seed in range(40):
            simulate(seed, Counters())
