"""The child-process side of the communicator conformance test.

Lives in its own module (not ``test_*``) so spawned children import it under its real
name. Each rank selects the platform by name, joins a process group over loopback, builds
the platform's communicator and checks every collective; an assertion error travels back
to the parent through ``torch.multiprocessing``.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

from kvplane.distributed.communicator import Communicator
from kvplane.plugins import select_platform
from kvplane.plugins.types import GroupInfo
from kvplane.testing.helpers import parse_dtype

WORLD_SIZE = 2
#: Seconds a rank waits for its peer at initialisation and in each collective.
TIMEOUT_S = 60


def run_rank(rank: int, platform_name: str, port: int) -> None:
    """Entry point of one child (``torch.multiprocessing`` passes ``rank`` first)."""
    platform = select_platform(platform_name)
    device_index = rank % platform.info.device_count
    device = platform.device(device_index)
    if device.type != "cpu" and torch.accelerator.is_available():
        torch.accelerator.set_device_index(device_index)
    dist.init_process_group(
        backend=platform.info.distributed_backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=datetime.timedelta(seconds=TIMEOUT_S),
    )
    try:
        communicator = platform.communicator(
            GroupInfo(group=dist.group.WORLD, rank=rank, world_size=WORLD_SIZE, device=device)
        )
        assert communicator is not None, "kvplane_communicator returned None"
        assert (communicator.rank, communicator.world_size) == (rank, WORLD_SIZE)
        for dtype_name in platform.info.supported_dtypes:
            check_collectives(communicator, rank, device, parse_dtype(dtype_name))
        check_send_recv(communicator, rank, device)
    finally:
        dist.destroy_process_group()


def _base(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # Small integers: sums are exact in every float dtype.
    return (torch.arange(1, 1 + torch.Size(shape).numel()) % 17).reshape(shape).to(device, dtype)


def _expect_equal(name: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    assert torch.equal(actual.cpu(), expected.cpu()), (
        f"{name} ({expected.dtype}):\n{actual.cpu()}\nexpected\n{expected.cpu()}"
    )


def check_collectives(
    communicator: Communicator, rank: int, device: torch.device, dtype: torch.dtype
) -> None:
    """all_reduce, all_gather, reduce_scatter and broadcast on both ranks."""
    scale = rank + 1  # rank 0 contributes 1x, rank 1 2x: the sum is 3x
    base = _base((4, 6), dtype, device)  # [4, 6]
    _expect_equal("all_reduce", communicator.all_reduce(base * scale), base * 3)

    mine = torch.full((2, 3), float(rank), dtype=dtype, device=device)  # [2, 3]
    zeros, ones = torch.zeros_like(mine), torch.ones_like(mine)
    _expect_equal(
        "all_gather(dim=0)", communicator.all_gather(mine, dim=0), torch.cat((zeros, ones))
    )
    _expect_equal(
        "all_gather(dim=1)", communicator.all_gather(mine, dim=1), torch.cat((zeros, ones), dim=1)
    )

    _expect_equal(
        "reduce_scatter(dim=0)",
        communicator.reduce_scatter(base * scale, dim=0),
        (base * 3).chunk(WORLD_SIZE, dim=0)[rank],
    )
    _expect_equal(
        "reduce_scatter(dim=1)",
        communicator.reduce_scatter(base * scale, dim=1),
        (base * 3).chunk(WORLD_SIZE, dim=1)[rank],
    )

    tensor = torch.full((5,), float(rank + 10), dtype=dtype, device=device)
    result = communicator.broadcast(tensor, src=1)
    _expect_equal("broadcast(src=1)", result, torch.full_like(tensor, 11.0))
    _expect_equal("broadcast(src=1) works in place", tensor, torch.full_like(tensor, 11.0))


def check_send_recv(communicator: Communicator, rank: int, device: torch.device) -> None:
    """Rank 0 sends to rank 1, which sends a different tensor back."""
    to_one = _base((3, 4), torch.float32, device) * 7
    to_zero = _base((3, 4), torch.float32, device) * -2
    if rank == 0:
        communicator.send(to_one, dst=1)
        buffer = torch.zeros_like(to_zero)
        received = communicator.recv(buffer, src=1)
        _expect_equal("recv on rank 0", received, to_zero)
        _expect_equal("recv on rank 0 works in place", buffer, to_zero)
    else:
        buffer = torch.zeros_like(to_one)
        received = communicator.recv(buffer, src=0)
        _expect_equal("recv on rank 1", received, to_one)
        _expect_equal("recv on rank 1 works in place", buffer, to_one)
        communicator.send(to_zero, dst=0)
