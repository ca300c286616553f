"""Reference-model preparation for the mixture-of-experts oracle tests."""

from __future__ import annotations

import torch

from .harness import randomize_norm_weights


def scale_moe_weights(model: torch.nn.Module, seed: int = 3) -> None:
    """Make routing decisive and experts matter, then randomize the norms.

    transformers draws every matrix from N(0, 0.02): router logits then sit within a few
    hundredths of each other (a rounding difference could flip a top-k choice) and the
    experts add little to the residual stream (a wrong expert could hide). Here the
    router's logits get a spread of order one and each expert matrix unit gain
    (N(0, 1 / fan_in)).
    """
    randomize_norm_weights(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):  # the router
                scale = 4.0 * param.shape[-1] ** -0.5
            elif ".experts." in name:
                scale = param.shape[-1] ** -0.5
            else:
                continue
            param.copy_(torch.randn(param.shape, generator=generator) * scale)
