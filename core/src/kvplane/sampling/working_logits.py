"""The logits a step's sampling works on: processed on a copy made by the first write,
and the packed allowed-token masks that grammars hand over."""

from __future__ import annotations

import torch


class WorkingLogits:
    """The step's logits as the processing steps see them: the model's tensor itself
    until a step writes, then a float32 copy made once, so the input is never modified
    and a step where no row processes its logits copies nothing."""

    def __init__(self, logits: torch.Tensor) -> None:  # [num_seqs, vocab_size]
        self._owned = logits.dtype != torch.float32
        self._logits = logits.float() if self._owned else logits  # [num_seqs, vocab_size]

    def read(self) -> torch.Tensor:  # [num_seqs, vocab_size] float32
        return self._logits

    def write(self) -> torch.Tensor:  # [num_seqs, vocab_size] float32, owned
        if not self._owned:
            self._logits = self._logits.clone()
            self._owned = True
        return self._logits


def unpack_bitmask(
    packed: torch.Tensor,  # [n, num_words] int32
    vocab_size: int,
) -> torch.Tensor:  # [n, vocab_size] bool
    """Packed bitmask rows to bool masks on ``packed``'s device; bit set = allowed."""
    shifts = torch.arange(32, dtype=torch.int32, device=packed.device)  # [32]
    # The shift is arithmetic (sign-extending) but "& 1" keeps only the shifted-down bit.
    bits = (packed.unsqueeze(-1) >> shifts) & 1  # [n, num_words, 32]
    return bits.reshape(packed.shape[0], -1)[:, :vocab_size].bool()
