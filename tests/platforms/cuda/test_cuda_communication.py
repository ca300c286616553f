"""The NCCL communicator, on machines with CUDA devices (skipped elsewhere)."""

from __future__ import annotations

import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kvplane.plugins.types import GroupInfo
from kvplane_cuda.communication import NcclCommunicator

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def worker(rank: int, world_size: int, port: int) -> None:
    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    dist.init_process_group(
        "nccl",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=120),
        device_id=device,
    )
    try:
        comm = NcclCommunicator(GroupInfo(None, rank, world_size, device))

        def rank_tensor(r: int) -> torch.Tensor:
            return (torch.arange(24, dtype=torch.float32) + 100 * r).view(4, 6).to(device)

        every = [rank_tensor(r) for r in range(world_size)]
        total = sum(every)
        assert torch.equal(comm.all_reduce(rank_tensor(rank)), total)
        for dim in (0, 1):
            assert torch.equal(comm.all_gather(rank_tensor(rank), dim), torch.cat(every, dim))
        for dim in (0, 1):
            if total.shape[dim] % world_size == 0:
                expected = total.chunk(world_size, dim)[rank]
                assert torch.equal(comm.reduce_scatter(rank_tensor(rank), dim), expected)
        tensor = rank_tensor(rank)
        assert torch.equal(comm.broadcast(tensor, src=world_size - 1), rank_tensor(world_size - 1))
        if world_size > 1:
            if rank == 0:
                comm.send(rank_tensor(0), dst=1)
            elif rank == 1:
                buffer = torch.zeros(4, 6, device=device)
                assert torch.equal(comm.recv(buffer, src=0), rank_tensor(0))
        torch.cuda.synchronize(device)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_nccl_collectives() -> None:
    world_size = min(2, torch.cuda.device_count())
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(worker, args=(world_size, port), nprocs=world_size, join=True)
