"""Acme's communicator: the next step once a single device works.

Not registered yet: multi-device runs use the core's reference communicator (plain
``torch.distributed`` on the backend named by ``PlatformInfo.distributed_backend``). To
use this class, add to ``plugin.py``::

    from kvplane.distributed.communicator import Communicator

    from kvplane_acme.communication import AcmeCommunicator

    @hookimpl
    def kvplane_communicator(group: types.GroupInfo) -> Communicator:
        return AcmeCommunicator(group)

and declare ``capabilities.MULTI_DEVICE`` in ``kvplane_platform_info``. The conformance
kit's collective tests then run against it.
"""

from __future__ import annotations

from kvplane.distributed.torch_communicator import TorchDistributedCommunicator


class AcmeCommunicator(TorchDistributedCommunicator):
    """Starts as the reference; declare what Acme's backend does differently.

    The class attributes of
    :class:`~kvplane.distributed.torch_communicator.TorchDistributedCommunicator` carry
    the usual differences (see the CPU and CUDA platforms' communicators). Here: Acme
    tensors live on the host, and the backend (gloo) has the single-tensor collectives,
    so an all-gather is one call into one preallocated buffer instead of a list of
    per-rank tensors. Override a method only for a collective that Acme's fabric runs
    itself (e.g. ``all_reduce`` through the vendor's runtime).
    """

    backend = "gloo"
    device_type = "cpu"  # the torch device Acme tensors live on
    has_tensor_collectives = True
