"""Copies between host memory and the device, pinned where the platform can pin.

A copy from pageable host memory waits for the device to finish all queued work, so a
dozen tiny index tensors per step would serialise host and device; from pinned (page-
locked) memory the copy is queued like a kernel and the host runs ahead. Whether memory
can be pinned is the platform's ``capabilities.PINNED_MEMORY`` flag, asked once when a
:class:`DeviceTransfer` is built; every per-step copy of the engine (step inputs, the
step graphs' staging buffers, the sampler's index lists and sampled tokens) goes through
one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from kvplane.plugins import capabilities

if TYPE_CHECKING:
    from kvplane.plugins.platform import Platform


class HostCopy:
    """A device-to-host copy in flight; :meth:`wait` returns the host tensor."""

    def __init__(self, host: torch.Tensor, event: torch.Event | None) -> None:
        self._host = host
        self._event = event

    def wait(self) -> torch.Tensor:
        """The host tensor, once the copy has run (blocks the calling thread until then)."""
        if self._event is not None:
            self._event.synchronize()
        return self._host


class DeviceTransfer:
    """Moves host data to ``device`` and results back, the same way everywhere.

    With ``pin_memory`` (the platform lists ``capabilities.PINNED_MEMORY``) host data is
    staged in pinned memory and copied without waiting for the device; without it every
    copy is a plain synchronous one. A copy within host memory (``device`` is the CPU)
    never pins: there is nothing to overlap.

    Contract for asynchronous copies: a pinned source must stay unchanged until its copy
    ran. :meth:`to_device` owns its staging (torch's caching host allocator does not
    reuse a pinned block before the copies queued from it ran); buffers from
    :meth:`staging_buffer` are the caller's to rotate. Immutable; shared by the model
    runner, its step graphs and the sampler, on the thread that owns the device.
    """

    __slots__ = ("device", "pin_memory")

    def __init__(self, device: torch.device, pin_memory: bool) -> None:
        self.device = device
        self.pin_memory = pin_memory and device.type != "cpu"

    @classmethod
    def for_platform(cls, platform: Platform, device: torch.device) -> DeviceTransfer:
        """Pinned when ``platform`` lists ``capabilities.PINNED_MEMORY``."""
        return cls(device, platform.has_capability(capabilities.PINNED_MEMORY))

    def staging_buffer(self, *shape: int, dtype: torch.dtype) -> torch.Tensor:  # [*shape]
        """A zeroed host tensor to fill and copy from repeatedly (pinned if possible)."""
        return torch.zeros(shape, dtype=dtype, pin_memory=self.pin_memory)

    def to_device(
        self, values: Sequence[int] | Sequence[float] | np.ndarray, dtype: torch.dtype
    ) -> torch.Tensor:  # [*values.shape]
        """A new device tensor holding ``values``; ``values`` may be reused at once.

        One host copy either way: into pinned memory (``as_tensor`` does not copy an array
        of the right dtype), or straight from ``values`` to the device.
        """
        if self.pin_memory:
            pinned = torch.as_tensor(values, dtype=dtype).pin_memory()
            return pinned.to(self.device, non_blocking=True)
        return torch.tensor(values, dtype=dtype, device=self.device)

    def copy_to_device(
        self, source: torch.Tensor, target: torch.Tensor | None = None
    ) -> torch.Tensor:  # [*source.shape]
        """Copy the host tensor ``source`` (a :meth:`staging_buffer` or a slice of one)
        into ``target`` on the device, or into a new device tensor; returns the copy."""
        if target is None:
            return source.to(self.device, non_blocking=self.pin_memory)
        return target.copy_(source, non_blocking=self.pin_memory)

    def to_host_async(self, tensor: torch.Tensor) -> HostCopy:
        """Queue a copy of the device tensor ``tensor`` to host memory.

        Into pinned memory the copy is queued like a kernel and an event marks its end;
        otherwise the copy is plain and already done (a host tensor is returned as is).
        """
        if not self.pin_memory or tensor.device.type == "cpu":
            return HostCopy(tensor.cpu(), None)
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        event = torch.Event(device=tensor.device)
        event.record()
        return HostCopy(host, event)


__all__ = ["DeviceTransfer", "HostCopy"]
