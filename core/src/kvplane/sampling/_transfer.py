"""Small per-step host-to-device transfers of Python lists, without stalling the host."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

# Device types whose tensors could not be filled from pinned memory (tried once each).
_NO_PINNING: set[str] = set()


def to_device(
    values: Sequence[int] | Sequence[float] | np.ndarray, dtype: torch.dtype, device: torch.device
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


class HostCopy:
    """A device-to-host copy in flight; :meth:`wait` returns the host tensor."""

    def __init__(self, host: torch.Tensor, event: torch.Event | None) -> None:
        self._host = host
        self._event = event

    def wait(self) -> torch.Tensor:
        if self._event is not None:
            self._event.synchronize()
        return self._host


def copy_to_host_async(tensor: torch.Tensor) -> HostCopy:
    """Queue a copy of ``tensor`` to host memory without waiting for the device.

    Into pinned memory, the copy is queued like a kernel and an event marks its end; where
    the device cannot pin (or is the host), the copy is plain and already done.
    """
    device = tensor.device
    if device.type == "cpu":
        return HostCopy(tensor, None)
    if device.type not in _NO_PINNING:
        try:
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            host.copy_(tensor, non_blocking=True)
            event = torch.Event(device=device)
            event.record()
            return HostCopy(host, event)
        except RuntimeError:  # no pinned memory or events for this accelerator
            _NO_PINNING.add(device.type)
    return HostCopy(tensor.cpu(), None)
