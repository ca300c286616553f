"""Token embedding and the output projection to vocabulary logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvplane.models.layers.context import BuildContext


class VocabEmbedding(torch.nn.Module):
    """``weight[token_ids]``; ``weight: [vocab_size, hidden_size]``."""

    def __init__(self, vocab_size: int, hidden_size: int, ctx: BuildContext) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(
            torch.empty(vocab_size, hidden_size, dtype=ctx.dtype), requires_grad=False
        )

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, hidden]
        return F.embedding(token_ids, self.weight)


class LMHead(torch.nn.Module):
    """Logits in float32 for the hidden states of sampled positions only.

    With tied embeddings it shares the embedding's weight instead of owning one.
    """

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        ctx: BuildContext,
        tied_to: VocabEmbedding | None = None,
        final_logit_softcap: float | None = None,
    ) -> None:
        super().__init__()
        self.tied_to = tied_to
        if tied_to is None:
            self.weight = torch.nn.Parameter(
                torch.empty(vocab_size, hidden_size, dtype=ctx.dtype), requires_grad=False
            )
        self.final_logit_softcap = final_logit_softcap

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [S, hidden] -> [S, vocab]
        weight = self.tied_to.weight if self.tied_to is not None else self.weight
        logits = F.linear(hidden, weight).float()
        if self.final_logit_softcap is not None:
            cap = self.final_logit_softcap
            logits = cap * torch.tanh(logits / cap)
        return logits
