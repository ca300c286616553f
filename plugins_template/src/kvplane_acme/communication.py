"""Acme's communicator: the next step once a single device works.

Not registered yet: multi-device runs use the core's reference communicator (plain
``torch.distributed`` on the backend named by ``PlatformInfo.distributed_backend``). To
use this class, add to ``plugin.py``::

    from kvplane.distributed.communicator import Communicator
    from kvplane.plugins.types import GroupInfo

    from kvplane_acme.communication import AcmeCommunicator

    @hookimpl
    def kvplane_communicator(group: GroupInfo) -> Communicator:
        return AcmeCommunicator(group)

and declare ``capabilities.MULTI_DEVICE`` in ``kvplane_platform_info``. The conformance
kit's collective tests then run against it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from kvplane.distributed.torch_communicator import TorchDistributedCommunicator

# Renamed in torch 2.13; torch 2.11 only has the old name.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class AcmeCommunicator(TorchDistributedCommunicator):
    """Starts as the reference; override the collectives Acme's fabric does better.

    The example overrides one: an all-gather into a single preallocated buffer instead
    of a list of per-rank tensors (one collective, one allocation).
    """

    def all_gather(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        source = tensor.movedim(dim, 0).contiguous()  # [size_dim, ...rest]
        gathered = source.new_empty((self.world_size * source.shape[0], *source.shape[1:]))
        _all_gather_single(gathered, source, group=self.group)
        return gathered.movedim(0, dim).contiguous()
