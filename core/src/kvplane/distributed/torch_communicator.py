"""A communicator over plain ``torch.distributed`` calls (any backend: gloo, nccl, ...)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from kvplane.distributed.communicator import Communicator

if TYPE_CHECKING:
    # Annotation only: importing kvplane.plugins here would be circular, since the
    # plugin package imports this module.
    from kvplane.plugins.types import GroupInfo


class TorchDistributedCommunicator(Communicator):
    """Collectives through ``torch.distributed`` on ``group``; the reference."""

    def __init__(self, group_info: GroupInfo) -> None:
        self.group = group_info.group
        self.rank = group_info.rank
        self.world_size = group_info.world_size

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)

    def reduce_scatter(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        if tensor.shape[dim] % self.world_size != 0:
            raise ValueError(
                f"reduce_scatter: size {tensor.shape[dim]} of dim {dim} is not divisible "
                f"by world size {self.world_size}"
            )
        # Summing then slicing works on every backend (gloo has no reduce_scatter).
        summed = self.all_reduce(tensor.clone())
        return summed.chunk(self.world_size, dim=dim)[self.rank].contiguous()

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        dist.broadcast(tensor, src=self._global_rank(src), group=self.group)
        return tensor

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        dist.send(tensor.contiguous(), dst=self._global_rank(dst), group=self.group)

    def recv(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        dist.recv(tensor, src=self._global_rank(src), group=self.group)
        return tensor

    def _global_rank(self, group_rank: int) -> int:
        if self.group is None:
            return group_rank
        return dist.get_global_rank(self.group, group_rank)
