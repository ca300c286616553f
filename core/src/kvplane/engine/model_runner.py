"""Model execution: KV-cache allocation, the forward pass, logits and sampling.

The runner makes no scheduling decisions: it executes what the scheduler decided.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from kvplane.engine.inputs import prepare_inputs
from kvplane.models.layers.attention import Attention
from kvplane.plugins.platform import Platform
from kvplane.plugins.types import BlockCopyRequest, KVCacheSpec, MemoryProfileRequest
from kvplane.sampling.sampler import (
    SampleLogprobs,
    Sampler,
    SequenceSamplingState,
    compute_prompt_logprobs,
)
from kvplane.scheduler.output import SchedulerOutput

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class StepResult:
    """What one step produced, keyed by request id."""

    sampled_token_ids: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, SampleLogprobs | None] = field(default_factory=dict)
    # Per request: (position of the first prompt token scored, logprobs per position).
    prompt_logprobs: dict[str, tuple[int, list[SampleLogprobs]]] = field(default_factory=dict)


class ModelRunner:
    """Owns the model and its KV cache on one device; runs one step at a time."""

    def __init__(
        self,
        model: torch.nn.Module,
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

    def bytes_per_block(self) -> int:
        """KV bytes one block costs across all layers."""
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

    def profile_activation_bytes(self, num_tokens: int) -> tuple[int, int]:
        """Run the largest step once through the platform's memory profiler.

        Returns ``(device total bytes, bytes available for the KV cache at utilization
        1.0)``; the caller applies the utilization fraction.
        """
        num_blocks = math.ceil(num_tokens / self.block_size)
        self.initialize_kv_cache(num_blocks)

        def run_forward() -> None:
            positions = torch.arange(num_tokens, device=self.device)
            from kvplane.attention.metadata import AttentionMetadata

            metadata = AttentionMetadata(
                slot_mapping=positions.clone(),
                query_start_loc=torch.tensor(
                    [0, num_tokens], dtype=torch.int32, device=self.device
                ),
                seq_lens=torch.tensor([num_tokens], dtype=torch.int32, device=self.device),
                block_tables=torch.arange(
                    num_blocks, dtype=torch.int32, device=self.device
                ).unsqueeze(0),
                max_query_len=num_tokens,
                max_seq_len=num_tokens,
                query_start_loc_cpu=(0, num_tokens),
                seq_lens_cpu=(num_tokens,),
            )
            with torch.inference_mode():
                hidden = self.model(torch.zeros_like(positions), positions, metadata)
                self.model.compute_logits(hidden[-1:])

        profile = self.platform.profile_memory(
            MemoryProfileRequest(device=self.device, run_forward=run_forward)
        )
        self.kv_caches = ()
        for layer in self.attention_layers:
            layer.kv_cache = None
        return profile.total_bytes, profile.total_bytes - profile.used_bytes - (
            profile.peak_activation_bytes
        )

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
        if output.block_copies:
            src, dst = zip(*output.block_copies, strict=True)
            self.platform.copy_blocks(BlockCopyRequest(self.kv_caches, src, dst))
        inputs = prepare_inputs(output, self.block_size, self.device, prompt_logprobs_ids)
        hidden = self.model(inputs.token_ids, inputs.positions, inputs.metadata)
        result = StepResult()
        if inputs.logits_indices.numel() == 0:
            return result
        logits = self.model.compute_logits(hidden[inputs.logits_indices])  # [rows, vocab]

        for piece in inputs.prompt_logprobs:
            num_top = states[piece.request_id].params.prompt_logprobs or 0
            rows = logits[list(piece.logit_rows)]
            result.prompt_logprobs[piece.request_id] = (
                piece.first_target_position,
                compute_prompt_logprobs(rows, piece.target_token_ids, num_top),
            )
        if inputs.sample_request_ids:
            sample_logits = logits[list(inputs.sample_rows)]
            sample_states = [states[request_id] for request_id in inputs.sample_request_ids]
            sampled = self.sampler(sample_logits, sample_states, self.batch_generator)
            for index, request_id in enumerate(inputs.sample_request_ids):
                result.sampled_token_ids[request_id] = sampled.sampled_token_ids[index]
                result.logprobs[request_id] = sampled.logprobs[index]
        return result
