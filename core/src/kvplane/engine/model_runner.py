"""Model execution: KV-cache allocation, the forward pass, logits and sampling.

The runner makes no scheduling decisions: it executes what the scheduler decided.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from kvplane.engine.inputs import (
    HostStepInputs,
    PlaceholderFixup,
    build_host_inputs,
    largest_step_inputs,
    to_device_inputs,
)
from kvplane.engine.step_graphs import StepGraphs
from kvplane.engine.step_timer import StepTimer
from kvplane.engine.transfer import DeviceTransfer
from kvplane.models.base import CausalLM
from kvplane.models.layers.attention import Attention
from kvplane.plugins.platform import Platform
from kvplane.plugins.types import BlockCopyRequest, KVCacheSpec, MemoryProfileRequest
from kvplane.sampling.params import SamplingParams
from kvplane.sampling.sampler import (
    PendingSamples,
    SampleLogprobs,
    Sampler,
    SequenceSamplingState,
    compute_prompt_logprobs,
)
from kvplane.scheduler.output import SchedulerOutput
from kvplane.scheduler.request import PLACEHOLDER_TOKEN_ID
from kvplane.spec_decode.verification import DraftVerification, VerifiedDrafts

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class StepResult:
    """What one step produced, keyed by request id."""

    sampled_token_ids: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, SampleLogprobs | None] = field(default_factory=dict)
    # Per request: (position of the first prompt token scored, logprobs per position).
    prompt_logprobs: dict[str, tuple[int, list[SampleLogprobs]]] = field(default_factory=dict)
    # Requests that had draft tokens: the drafts they kept, which precede their sampled
    # token (see :mod:`kvplane.spec_decode.verification`).
    verified: dict[str, VerifiedDrafts] = field(default_factory=dict)

    def accepted_token_ids(self) -> dict[str, tuple[int, ...]]:
        """Each request's accepted drafts, for ``Scheduler.update_from_output``."""
        return {rid: v.accepted_token_ids for rid, v in self.verified.items()}


class ModelRunner:
    """Owns the model and its KV cache on one device; runs one step at a time."""

    def __init__(
        self,
        model: CausalLM,
        platform: Platform,
        device: torch.device,
        block_size: int,
        sampler: Sampler,
        seed: int,
    ) -> None:
        self.model = model
        self.platform = platform
        self.device = device
        self.block_size = block_size
        self.sampler = sampler
        self.attention_layers = [m for m in model.modules() if isinstance(m, Attention)]
        self.kv_caches: tuple[torch.Tensor, ...] = ()
        # Set by :meth:`use_step_graphs` once the KV cache is bound (empty: all eager).
        self.step_graphs: tuple[StepGraphs, ...] = ()
        self.timer = StepTimer()
        #: Every host-to-device copy of a step, and the step graphs' staging buffers.
        self.transfer = DeviceTransfer.for_platform(platform, device)
        # The last launch's sampled tokens (device) and each sampled request's row in them,
        # where the next launch finds the ids of its placeholder input tokens.
        self._last_sampled: tuple[dict[str, int], torch.Tensor] | None = None
        # Noise for unseeded requests; seeded ones carry their own generator.
        self.batch_generator = torch.Generator(device=device).manual_seed(seed)

    # -- KV cache ------------------------------------------------------------------------

    def kv_cache_specs(self, num_blocks: int) -> list[KVCacheSpec]:
        return [
            KVCacheSpec(
                num_blocks=num_blocks,
                block_size=self.block_size,
                num_kv_heads=layer.spec.num_kv_heads,
                head_size=layer.spec.head_size,
                dtype=layer.spec.kv_cache_dtype or layer.spec.dtype,
                device=self.device,
            )
            for layer in self.attention_layers
        ]

    def kv_cache_dtype(self) -> torch.dtype:
        """What the KV cache stores (the first layer's; every layer shares the setting)."""
        return self.kv_cache_specs(1)[0].dtype

    def bytes_per_block(self) -> int:
        """KV bytes one block costs across all layers (from each cache's element size,
        so an FP8 cache holds twice the blocks of a bfloat16 one in the same bytes)."""
        return sum(spec.bytes_per_block for spec in self.kv_cache_specs(1))

    def initialize_kv_cache(self, num_blocks: int) -> None:
        """Allocate every layer's cache through the platform and bind it to its layer."""
        caches = []
        for layer, spec in zip(self.attention_layers, self.kv_cache_specs(num_blocks), strict=True):
            cache = self.platform.allocate_kv_cache(spec)
            if tuple(cache.shape) != spec.shape:
                raise RuntimeError(
                    f"platform {self.platform.name!r} allocated a KV cache of shape "
                    f"{tuple(cache.shape)}, expected {spec.shape}"
                )
            layer.kv_cache = cache
            caches.append(cache)
        self.kv_caches = tuple(caches)

    def profile_activation_bytes(
        self, num_tokens: int, max_seq_len: int, num_sampled_rows: int
    ) -> tuple[int, int]:
        """Run the largest step once through the platform's memory profiler: a forward of
        ``num_tokens`` prompt tokens (sequences of at most ``max_seq_len``), the logits of
        ``num_sampled_rows`` of them and their sampling, with a temperature, top-k and top-p.

        Returns ``(device total bytes, bytes available for the KV cache at utilization
        1.0)``; the caller applies the utilization fraction. The memory the step used
        stays with the platform's allocator (where it caches), so later steps reuse it.
        """
        host = largest_step_inputs(num_tokens, max_seq_len, self.block_size, num_sampled_rows)
        self.initialize_kv_cache(int(host.block_tables.max()) + 1)
        # The sampler's longest path: temperature division, top-k and top-p.
        params = SamplingParams(temperature=0.7, top_k=50, top_p=0.9, detokenize=False)
        states = [
            SequenceSamplingState(params=params, prompt_token_ids=[0], output_token_ids=[])
            for _ in host.sample_request_ids
        ]

        def run_forward() -> None:
            with torch.inference_mode():
                inputs = to_device_inputs(host, self.transfer)
                hidden = self.model(inputs.token_ids, inputs.positions, inputs.metadata)
                logits = self.model.compute_logits(hidden[inputs.logits_indices])
                self.sampler.launch(logits, states, self.batch_generator, self.transfer).result()

        profile = self.platform.profile_memory(
            MemoryProfileRequest(device=self.device, run_forward=run_forward)
        )
        self.kv_caches = ()
        for layer in self.attention_layers:
            layer.kv_cache = None
        return profile.total_bytes, profile.total_bytes - profile.used_bytes - (
            profile.peak_activation_bytes
        )

    # -- graphs ---------------------------------------------------------------------------

    def use_step_graphs(self, step_graphs: tuple[StepGraphs, ...]) -> None:
        """Run the steps each of ``step_graphs`` takes through it from now on, capturing
        them now (the KV cache must be bound: capture runs the forward)."""
        if not self.kv_caches:
            raise RuntimeError("bind the KV cache before capturing graphs")
        with torch.inference_mode():
            for graphs in step_graphs:
                graphs.capture()
        self.step_graphs = step_graphs

    # -- a step --------------------------------------------------------------------------

    @torch.inference_mode()
    def execute(
        self,
        output: SchedulerOutput,
        states: Mapping[str, SequenceSamplingState],
        prompt_logprobs_ids: frozenset[str] = frozenset(),
    ) -> StepResult:
        """Run the forward pass for ``output`` and sample every request that needs a token.

        ``states`` holds the sampling state of every request sampled this step.
        """
        return self.launch(output, states, prompt_logprobs_ids).result()

    @torch.inference_mode()
    def launch(
        self,
        output: SchedulerOutput,
        states: Mapping[str, SequenceSamplingState],
        prompt_logprobs_ids: frozenset[str] = frozenset(),
    ) -> PendingStep:
        """Queue the step on the device and return without waiting for its tokens.

        Input tokens that are still placeholders (:data:`PLACEHOLDER_TOKEN_ID`) must have
        been sampled by the previous launch: their ids are taken from its device tensor.
        """
        if output.block_copies:
            src, dst = zip(*output.block_copies, strict=True)
            self.platform.copy_blocks(BlockCopyRequest(self.kv_caches, src, dst))
        with self.timer.phase("prepare"):
            host = build_host_inputs(output, self.block_size, prompt_logprobs_ids)
            fixup = self._placeholder_fixup(output, host)
        pending = PendingStep(host)
        with self.timer.phase("forward"):
            hidden = self._forward(host, fixup)  # [num_logit_rows, hidden_size]
            if len(host.logits_indices) == 0:
                return pending
            logits = self.model.compute_logits(hidden)  # [rows, vocab]
        for piece in host.prompt_logprobs:
            num_top = states[piece.request_id].params.prompt_logprobs or 0
            piece_logits = logits[list(piece.logit_rows)]  # [positions, vocab]
            pending.prompt_logprobs[piece.request_id] = (
                piece.first_target_position,
                compute_prompt_logprobs(piece_logits, piece.target_token_ids, num_top),
            )
        with self.timer.phase("sample"):
            if host.draft_token_ids:  # before the sampler draws any noise
                pending.verification = DraftVerification(
                    host.draft_token_ids, states, self.sampler.vocab_size
                )
            pending.samples = self._launch_sampling(host, logits, states)
        if pending.samples is not None:
            rows = {request_id: row for row, request_id in enumerate(host.sample_request_ids)}
            self._last_sampled = (rows, pending.samples.sampled)
        return pending

    def _placeholder_fixup(
        self, output: SchedulerOutput, host: HostStepInputs
    ) -> PlaceholderFixup | None:
        """Where the step's input tokens are placeholders, the previous launch's rows."""
        placeholders = np.flatnonzero(host.token_ids == PLACEHOLDER_TOKEN_ID)
        if len(placeholders) == 0:
            return None
        if self._last_sampled is None:
            raise RuntimeError("placeholder tokens but no earlier step sampled them")
        row_of_request, sampled = self._last_sampled
        seq_indices = np.searchsorted(host.query_start_loc, placeholders, side="right") - 1
        source_rows = np.full(host.num_tokens, -1, dtype=np.int64)
        for token_index, seq_index in zip(placeholders, seq_indices, strict=True):
            request_id = output.scheduled[seq_index].request.request_id
            source_rows[token_index] = row_of_request[request_id]
        return PlaceholderFixup(self.transfer.to_device(source_rows, torch.int64), sampled)

    def _forward(
        self, host: HostStepInputs, fixup: PlaceholderFixup | None
    ) -> torch.Tensor:  # [num_logit_rows, hidden]
        """Hidden states of the rows whose logits the step needs."""
        for graphs in self.step_graphs:
            bucket = graphs.bucket_for(host)
            if bucket is not None:
                return graphs.run(host, bucket, fixup)
        inputs = to_device_inputs(host, self.transfer)
        if fixup is not None:
            fixup.apply(inputs.token_ids)
        hidden = self.model(inputs.token_ids, inputs.positions, inputs.metadata)
        return hidden[inputs.logits_indices]

    def _launch_sampling(
        self,
        host: HostStepInputs,
        logits: torch.Tensor,  # [num_logit_rows, vocab]
        states: Mapping[str, SequenceSamplingState],
    ) -> PendingSamples | None:
        if not host.sample_request_ids:
            return None
        rows = host.sample_rows
        # Indexing with a list copies it to the device; most steps need no gather.
        whole = rows == tuple(range(logits.shape[0]))
        sample_logits = logits if whole else logits[list(rows)]
        sample_states = [states[request_id] for request_id in host.sample_request_ids]
        return self.sampler.launch(
            sample_logits, sample_states, self.batch_generator, self.transfer
        )


class PendingStep:
    """A launched step; :meth:`result` waits for its tokens and returns them by request."""

    def __init__(self, host: HostStepInputs) -> None:
        self.host = host
        self.samples: PendingSamples | None = None
        self.prompt_logprobs: dict[str, tuple[int, list[SampleLogprobs]]] = {}
        self.verification: DraftVerification | None = None
        self._result: StepResult | None = None

    def result(self) -> StepResult:
        """The step's tokens by request (waits for the device the first time)."""
        if self._result is None:
            self._result = self._collect()
        return self._result

    def _collect(self) -> StepResult:
        result = StepResult(prompt_logprobs=self.prompt_logprobs)
        if self.samples is None:
            return result
        sampled = self.samples.result()
        if self.verification is not None:
            rows = self.verification.split(
                self.host.sample_request_ids, sampled.sampled_token_ids, sampled.logprobs
            )
            for request_id, token_id, logprobs, verified in rows:
                result.sampled_token_ids[request_id] = token_id
                result.logprobs[request_id] = logprobs
                if verified is not None:
                    result.verified[request_id] = verified
            return result
        for index, request_id in enumerate(self.host.sample_request_ids):
            result.sampled_token_ids[request_id] = sampled.sampled_token_ids[index]
            result.logprobs[request_id] = sampled.logprobs[index]
        return result
