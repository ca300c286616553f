"""The interface of a communicator over one process group."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class Communicator(ABC):
    """Collectives over one torch.distributed process group.

    Every call is collective: all ranks of the group must make it, in the same order.
    Results are returned as new tensors unless the method says it works in place.
    """

    rank: int
    world_size: int

    @abstractmethod
    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the group; returns the sum (may reuse ``tensor``)."""

    @abstractmethod
    def all_gather(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Concatenate every rank's ``tensor`` along ``dim`` in rank order."""

    @abstractmethod
    def reduce_scatter(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Sum over the group, then return this rank's ``1/world_size`` slice of ``dim``."""

    @abstractmethod
    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Copy ``src``'s ``tensor`` into every rank's ``tensor`` (in place) and return it."""

    @abstractmethod
    def send(self, tensor: torch.Tensor, dst: int) -> None:
        """Send ``tensor`` to group rank ``dst`` (blocks until it is handed off)."""

    @abstractmethod
    def recv(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """Receive into ``tensor`` (in place) from group rank ``src`` and return it."""
