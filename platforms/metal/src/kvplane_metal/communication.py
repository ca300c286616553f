"""Collectives between Mac processes over gloo (``torch.distributed``).

gloo has no MPS tensors, so each collective stages its tensor through the host and
copies the result back; the rest is the core's
:class:`~kvplane.distributed.torch_communicator.TorchDistributedCommunicator`. Several
processes on one Mac share one GPU, so this serves tests and the rare multi-process
set-up, not speed.
"""

from __future__ import annotations

import torch

from kvplane.distributed.torch_communicator import TorchDistributedCommunicator


class MetalGlooCommunicator(TorchDistributedCommunicator):
    """Collectives of one gloo process group over tensors on ``mps`` (or, emulated, the
    host); half-precision sums in float32, as the CPU platform's."""

    backend = "gloo"
    has_tensor_collectives = True
    float32_sum_dtypes = (torch.float16, torch.bfloat16)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device.type == "cpu":
            return super().all_reduce(tensor)
        return tensor.copy_(super().all_reduce(tensor.cpu()))

    def all_gather(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        return super().all_gather(tensor.cpu(), dim).to(tensor.device)

    def reduce_scatter(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        return super().reduce_scatter(tensor.cpu(), dim).to(tensor.device)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        if tensor.device.type == "cpu":
            return super().broadcast(tensor, src)
        return tensor.copy_(super().broadcast(tensor.cpu(), src))

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        super().send(tensor.cpu(), dst)

    def recv(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        if tensor.device.type == "cpu":
            return super().recv(tensor, src)
        return tensor.copy_(super().recv(tensor.cpu(), src))
