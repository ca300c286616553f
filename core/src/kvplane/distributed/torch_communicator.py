"""A communicator over plain ``torch.distributed`` calls (any backend: gloo, nccl, ...).

:class:`TorchDistributedCommunicator` is the reference (what the core uses when a
platform registers no communicator) and the base of the platforms' communicators: they
subclass it and declare what their backend does differently through its class
attributes (the device their tensors live on, whether the backend has the single-tensor
collectives, which dtypes to sum in float32), overriding methods only for a collective
they implement otherwise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from kvplane.distributed.communicator import Communicator

if TYPE_CHECKING:
    # Annotation only: importing kvplane.plugins here would be circular, since the
    # plugin package imports this module.
    from kvplane.plugins.types import GroupInfo

# torch 2.13 renamed the tensor collectives; 2.11 only has the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class TorchDistributedCommunicator(Communicator):
    """Collectives through ``torch.distributed`` on ``group_info.group``.

    Group ranks (what callers pass to :meth:`broadcast`, :meth:`send`, :meth:`recv`) are
    mapped to global ranks once, at construction. Every method is collective or
    point-to-point as :class:`Communicator` states; results are new tensors except where
    a method says "in place" (a non-contiguous tensor goes through a contiguous copy).
    """

    #: Name of the ``torch.distributed`` backend, for messages.
    backend: str = "torch.distributed"
    #: The torch device type every tensor lives on; ``None``: not checked.
    device_type: str | None = None
    #: Whether the backend has the single-tensor collectives (``all_gather_into_tensor``,
    #: ``reduce_scatter_tensor``): one buffer and one call instead of a list of per-rank
    #: tensors, or an all-reduce followed by a slice (what works on every backend).
    has_tensor_collectives: bool = False
    #: Dtypes summed in float32 and cast back, for backends whose sums in these dtypes
    #: round at every step of the ring (a float32 sum rounds once).
    float32_sum_dtypes: tuple[torch.dtype, ...] = ()

    def __init__(self, group_info: GroupInfo) -> None:
        self.group = group_info.group
        self.rank = group_info.rank
        self.world_size = group_info.world_size
        self.device = group_info.device
        if self.device_type is not None and self.device.type != self.device_type:
            raise ValueError(
                f"the {self.backend} communicator works on '{self.device_type}' devices, "
                f"not {self.device}"
            )
        if self.group is None or self.group is dist.group.WORLD:
            self._global_ranks = list(range(self.world_size))
        else:
            self._global_ranks = [
                dist.get_global_rank(self.group, r) for r in range(self.world_size)
            ]

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the group, in place (through a float32 or contiguous copy if needed)."""
        if tensor.dtype in self.float32_sum_dtypes:
            summed = tensor.float()
            dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=self.group)
            return tensor.copy_(summed)
        if not tensor.is_contiguous():
            return tensor.copy_(self.all_reduce(tensor.contiguous()))
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Concatenate every rank's ``tensor`` along ``dim`` in rank order."""
        dim = normalise_dim(tensor, dim)
        if not self.has_tensor_collectives:
            parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
            dist.all_gather(parts, tensor.contiguous(), group=self.group)
            return torch.cat(parts, dim=dim)
        # Gather along dim 0 into one tensor, then move the rank axis next to ``dim``.
        source = tensor.movedim(dim, 0).contiguous()  # [size_dim, ...rest]
        gathered = source.new_empty((self.world_size * source.shape[0], *source.shape[1:]))
        _all_gather_single(gathered, source, group=self.group)
        return gathered.movedim(0, dim).contiguous() if dim != 0 else gathered

    def reduce_scatter(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Sum over the group, then return this rank's ``1/world_size`` slice of ``dim``."""
        dim = normalise_dim(tensor, dim)
        if tensor.shape[dim] % self.world_size != 0:
            raise ValueError(
                f"reduce_scatter: size {tensor.shape[dim]} of dim {dim} is not divisible "
                f"by world size {self.world_size}"
            )
        if not self.has_tensor_collectives:
            summed = self.all_reduce(tensor.clone())
            return summed.chunk(self.world_size, dim=dim)[self.rank].contiguous()
        dtype = tensor.dtype
        source = tensor.movedim(dim, 0)
        source = (source.float() if dtype in self.float32_sum_dtypes else source).contiguous()
        output = source.new_empty((source.shape[0] // self.world_size, *source.shape[1:]))
        _reduce_scatter_single(output, source, op=dist.ReduceOp.SUM, group=self.group)
        return output.to(dtype).movedim(0, dim).contiguous()

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Copy group rank ``src``'s ``tensor`` into every rank's ``tensor``, in place."""
        if not tensor.is_contiguous():
            return tensor.copy_(self.broadcast(tensor.contiguous(), src))
        dist.broadcast(tensor, src=self.global_rank(src), group=self.group)
        return tensor

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        """Send ``tensor`` to group rank ``dst``; returns once the backend has it."""
        dist.send(tensor.contiguous(), dst=self.global_rank(dst), group=self.group)

    def recv(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """Receive into ``tensor`` (in place) from group rank ``src`` and return it."""
        if not tensor.is_contiguous():
            return tensor.copy_(self.recv(tensor.contiguous(), src))
        dist.recv(tensor, src=self.global_rank(src), group=self.group)
        return tensor

    def global_rank(self, group_rank: int) -> int:
        """The global rank of this group's rank ``group_rank``; ``ValueError`` if none."""
        if not 0 <= group_rank < self.world_size:
            raise ValueError(f"rank {group_rank} is not in a group of {self.world_size}")
        return self._global_ranks[group_rank]


def normalise_dim(tensor: torch.Tensor, dim: int) -> int:
    """``dim`` as a non-negative index of ``tensor``'s dims; ``ValueError`` if out of range."""
    if not -tensor.dim() <= dim < tensor.dim():
        raise ValueError(f"dim {dim} is out of range for a {tensor.dim()}-d tensor")
    return dim % tensor.dim()
