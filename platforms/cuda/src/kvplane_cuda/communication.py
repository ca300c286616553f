"""Collectives between GPU processes over NCCL (``torch.distributed``).

Everything but the differences below is the core's
:class:`~kvplane.distributed.torch_communicator.TorchDistributedCommunicator`: each call
is one NCCL collective, enqueued on the current stream. A custom one-shot all-reduce for
small tensors (as vLLM has) would override :meth:`NcclCommunicator.all_reduce` here
later, in front of NCCL.
"""

from __future__ import annotations

from kvplane.distributed.torch_communicator import TorchDistributedCommunicator


class NcclCommunicator(TorchDistributedCommunicator):
    """Collectives of one NCCL process group; tensors live on ``group_info.device``."""

    backend = "NCCL"
    device_type = "cuda"
    has_tensor_collectives = True
