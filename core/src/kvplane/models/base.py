"""The model contract: what the engine calls on every model, stated once."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import torch

from kvplane.attention.metadata import AttentionMetadata
from kvplane.models.weights import load_named_weights

if TYPE_CHECKING:
    from kvplane.models.layers.embedding import LMHead


class CausalLM(torch.nn.Module, ABC):
    """A decoder-only language model as the engine runs it.

    Built once per process as ``cls(hf_config, ctx)`` under ``torch.device(ctx.device)``
    (:func:`kvplane.models.loader.build_model`, through :mod:`kvplane.models.registry`),
    then filled by :meth:`load_weights` (or with random weights). The model runner then
    calls :meth:`forward` once per step (eagerly or inside a captured graph) and
    :meth:`compute_logits` on the rows it samples from, on the engine's thread.

    Subclasses implement :meth:`forward`; the defaults of :meth:`compute_logits` and
    :meth:`load_weights` fit a model with an ``lm_head``
    (:class:`~kvplane.models.layers.embedding.LMHead`) whose checkpoint names follow its
    module tree, up to :attr:`stacked_params` and :attr:`ignored_suffixes`.
    """

    #: Checkpoint matrices stacked into one kvplane layer: (ours, theirs, shard index;
    #: None when the checkpoint tensor already holds every shard).
    stacked_params: Sequence[tuple[str, str, int | None]] = ()
    #: Checkpoint tensors that carry nothing the model needs.
    ignored_suffixes: Sequence[str] = ()
    #: Hidden states to logits, used by the default :meth:`compute_logits`.
    lm_head: LMHead

    @abstractmethod
    def forward(
        self,
        token_ids: torch.Tensor,  # [num_tokens] int64, the new tokens of every sequence
        positions: torch.Tensor,  # [num_tokens] int64, each token's position in its sequence
        metadata: AttentionMetadata,
    ) -> torch.Tensor:  # [num_tokens, hidden_size]
        """Run one step over the flattened new tokens of the batch.

        Each attention layer writes the new tokens' keys and values into its KV cache at
        ``metadata.slot_mapping`` and attends over its sequence's cached context; nothing
        else is mutated. Returns the final hidden states (after the last norm).
        """

    def compute_logits(
        self,
        hidden: torch.Tensor,  # [num_rows, hidden_size], rows of forward's result
    ) -> torch.Tensor:  # [num_rows, vocab_size] float32
        """The next-token logits of ``hidden``'s rows (any final soft-cap applied)."""
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy ``(checkpoint name, tensor)`` pairs into the parameters; return the names
        of the parameters filled (with shard suffixes for stacked layers), which the
        loader checks against every parameter the model has. Subclasses adapt names or
        layouts and then call this."""
        return load_named_weights(self, weights, self.stacked_params, self.ignored_suffixes)
