"""Small per-step host-to-device transfers of Python lists, without stalling the host."""

from __future__ import annotations

from collections.abc import Sequence

import torch

# Device types whose tensors could not be filled from pinned memory (tried once each).
_NO_PINNING: set[str] = set()


def to_device(
    values: Sequence[int] | Sequence[float], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:  # [len(values)]
    """``torch.tensor(values)`` on ``device``, copied asynchronously where possible.

    A copy from pageable host memory waits for the device to finish all queued work, so a
    dozen tiny index tensors per step would serialise host and device; from pinned memory
    the copy is queued like a kernel. The pinned buffer stays valid until the copy ran:
    torch's caching host allocator does not reuse it earlier.
    """
    tensor = torch.tensor(values, dtype=dtype)
    if device.type == tensor.device.type:  # already where it is needed (host tensors)
        return tensor
    if device.type not in _NO_PINNING:
        try:
            return tensor.pin_memory().to(device, non_blocking=True)
        except RuntimeError:  # no pinned memory for this accelerator: copy synchronously
            _NO_PINNING.add(device.type)
    return tensor.to(device)
