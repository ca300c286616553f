"""Collectives between CPU processes over gloo (``torch.distributed``).

Everything but the differences below is the core's
:class:`~kvplane.distributed.torch_communicator.TorchDistributedCommunicator`.
"""

from __future__ import annotations

import torch

from kvplane.distributed.torch_communicator import TorchDistributedCommunicator


class GlooCommunicator(TorchDistributedCommunicator):
    """Collectives of one gloo process group; all tensors live on the CPU.

    gloo has the single-tensor collectives, and its half-precision sums round at every
    step of the ring, so float16 and bfloat16 are summed in float32 (rounded once).
    """

    backend = "gloo"
    device_type = "cpu"
    has_tensor_collectives = True
    float32_sum_dtypes = (torch.float16, torch.bfloat16)
