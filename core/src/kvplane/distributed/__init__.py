"""Communication: the communicator interface and the torch.distributed reference."""

from kvplane.distributed.communicator import Communicator
from kvplane.distributed.torch_communicator import TorchDistributedCommunicator

__all__ = ["Communicator", "TorchDistributedCommunicator"]
