"""Collectives between CPU processes over gloo (``torch.distributed``)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from kvplane.distributed.communicator import Communicator
from kvplane.plugins.types import GroupInfo

# torch 2.13 renamed the tensor collectives; 2.11 only has the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

#: Dtypes summed in float32 (and cast back): gloo's half-precision sums round at every
#: step of the ring, float32 sums round once.
_UPCAST_FOR_SUM = (torch.float16, torch.bfloat16)


class GlooCommunicator(Communicator):
    """Collectives of one gloo process group; all tensors live on the CPU.

    Group ranks (what callers pass to :meth:`broadcast`, :meth:`send`, :meth:`recv`) are
    mapped to global ranks once, at construction. Every method is collective or
    point-to-point as :class:`Communicator` states; results are new tensors except where
    it says "in place".
    """

    def __init__(self, group_info: GroupInfo) -> None:
        self.group = group_info.group
        self.rank = group_info.rank
        self.world_size = group_info.world_size
        if group_info.device.type != "cpu":
            raise ValueError(f"the gloo communicator works on 'cpu', not {group_info.device}")
        if self.group is None or self.group is dist.group.WORLD:
            self._global_ranks = list(range(self.world_size))
        else:
            self._global_ranks = [
                dist.get_global_rank(self.group, r) for r in range(self.world_size)
            ]

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the group, in place when ``tensor`` is contiguous and not half precision."""
        if tensor.dtype in _UPCAST_FOR_SUM:
            summed = tensor.float()
            dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=self.group)
            return tensor.copy_(summed)
        if not tensor.is_contiguous():
            return tensor.copy_(self.all_reduce(tensor.contiguous()))
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Concatenate every rank's ``tensor`` along ``dim`` in rank order (one buffer)."""
        dim = _normalise_dim(tensor, dim)
        # Gather along dim 0 into one tensor, then move the rank axis next to ``dim``.
        source = tensor.movedim(dim, 0).contiguous()  # [size_dim, ...rest]
        gathered = torch.empty(
            (self.world_size * source.shape[0], *source.shape[1:]),
            dtype=tensor.dtype,
            device=tensor.device,
        )
        _all_gather_single(gathered, source, group=self.group)
        return gathered.movedim(0, dim).contiguous() if dim != 0 else gathered

    def reduce_scatter(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Sum over the group, then return this rank's ``1/world_size`` slice of ``dim``."""
        dim = _normalise_dim(tensor, dim)
        if tensor.shape[dim] % self.world_size != 0:
            raise ValueError(
                f"reduce_scatter: size {tensor.shape[dim]} of dim {dim} is not divisible "
                f"by world size {self.world_size}"
            )
        dtype = tensor.dtype
        source = tensor.movedim(dim, 0)
        source = (source.float() if dtype in _UPCAST_FOR_SUM else source).contiguous()
        output = torch.empty(
            (source.shape[0] // self.world_size, *source.shape[1:]),
            dtype=source.dtype,
            device=source.device,
        )
        _reduce_scatter_single(output, source, op=dist.ReduceOp.SUM, group=self.group)
        return output.to(dtype).movedim(0, dim).contiguous()

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Copy group rank ``src``'s ``tensor`` into every rank's ``tensor``, in place."""
        if not tensor.is_contiguous():
            return tensor.copy_(self.broadcast(tensor.contiguous(), src))
        dist.broadcast(tensor, src=self._global_rank(src), group=self.group)
        return tensor

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        """Send ``tensor`` to group rank ``dst``; returns once gloo has handed it off."""
        dist.send(tensor.contiguous(), dst=self._global_rank(dst), group=self.group)

    def recv(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """Receive into ``tensor`` (in place) from group rank ``src`` and return it."""
        if not tensor.is_contiguous():
            return tensor.copy_(self.recv(tensor.contiguous(), src))
        dist.recv(tensor, src=self._global_rank(src), group=self.group)
        return tensor

    def _global_rank(self, group_rank: int) -> int:
        if not 0 <= group_rank < self.world_size:
            raise ValueError(f"rank {group_rank} is not in a group of {self.world_size}")
        return self._global_ranks[group_rank]


def _normalise_dim(tensor: torch.Tensor, dim: int) -> int:
    if not -tensor.dim() <= dim < tensor.dim():
        raise ValueError(f"dim {dim} is out of range for a {tensor.dim()}-d tensor")
    return dim % tensor.dim()
