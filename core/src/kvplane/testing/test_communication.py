"""Conformance: the platform's communicator across two real processes.

Two spawned children select the platform by name, join a process group over loopback
with ``platform.info.distributed_backend`` and check every collective of the
:class:`~kvplane.distributed.communicator.Communicator` (see
:mod:`kvplane.testing.comm_worker`). Platforms without the ``multi_device`` capability
are skipped; accelerator platforms need two devices, host (``cpu``) ones share one.
"""

from __future__ import annotations

import socket
import time

import pytest
import torch.multiprocessing as mp

from kvplane.plugins import Platform
from kvplane.plugins.capabilities import MULTI_DEVICE
from kvplane.testing import comm_worker

#: Seconds the parent waits for both children before killing them.
DEADLINE_S = 2 * comm_worker.TIMEOUT_S


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_communicator_collectives_in_two_processes(kvplane_platform: Platform) -> None:
    info = kvplane_platform.info
    if MULTI_DEVICE not in info.capabilities:
        pytest.skip(
            f"platform {info.name!r} lacks the {MULTI_DEVICE!r} capability (list "
            "capabilities.MULTI_DEVICE in PlatformInfo once its communicator runs across "
            "processes, to run these)"
        )
    if info.device_count < 1:
        pytest.skip(f"platform {info.name!r} reports no device")
    if info.device_type != "cpu" and info.device_count < comm_worker.WORLD_SIZE:
        pytest.skip(
            f"two ranks need {comm_worker.WORLD_SIZE} {info.device_type} devices, "
            f"platform {info.name!r} has {info.device_count}"
        )
    context = mp.start_processes(
        comm_worker.run_rank,
        args=(kvplane_platform.name, _free_port()),
        nprocs=comm_worker.WORLD_SIZE,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + DEADLINE_S
    try:
        # join() re-raises a child's exception with its traceback.
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"communicator test did not finish within {DEADLINE_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()
