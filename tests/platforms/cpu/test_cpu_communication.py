"""The gloo communicator across two real processes."""

from __future__ import annotations

import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kvplane.plugins.types import GroupInfo
from kvplane_cpu.communication import GlooCommunicator

WORLD_SIZE = 2
TIMEOUT_S = 90


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker(rank: int, port: int) -> None:
    """Runs in each spawned process; any failed check raises and fails the test."""
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=timedelta(seconds=TIMEOUT_S),
    )
    try:
        comm = GlooCommunicator(GroupInfo(None, rank, WORLD_SIZE, torch.device("cpu")))
        check_collectives(comm, rank)
        check_point_to_point(comm, rank)
        check_group_ranks_map_to_global_ranks(rank)
    finally:
        dist.destroy_process_group()


def rank_tensor(rank: int, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A tensor whose values differ per rank and per element."""
    numel = torch.Size(shape).numel()
    return (torch.arange(numel, dtype=torch.float32) + 100 * rank).view(shape).to(dtype)


def check_collectives(comm: GlooCommunicator, rank: int) -> None:
    every = [rank_tensor(r, 4, 6) for r in range(WORLD_SIZE)]
    total = sum(every)

    tensor = rank_tensor(rank, 4, 6)
    out = comm.all_reduce(tensor)
    assert out is tensor and torch.equal(out, total)
    # Half precision is summed in float32 and written back in place.
    half = rank_tensor(rank, 4, 6, dtype=torch.bfloat16)
    assert torch.equal(comm.all_reduce(half), total.to(torch.bfloat16))
    assert half.dtype == torch.bfloat16 and torch.equal(half, total.to(torch.bfloat16))
    # A non-contiguous view is reduced in place in its base tensor.
    base = rank_tensor(rank, 4, 12)
    comm.all_reduce(base[:, ::2])
    expected = sum(rank_tensor(r, 4, 12) for r in range(WORLD_SIZE))
    assert torch.equal(base[:, ::2], expected[:, ::2])
    assert torch.equal(base[:, 1::2], rank_tensor(rank, 4, 12)[:, 1::2])

    for dim in (0, 1, -1):
        gathered = comm.all_gather(rank_tensor(rank, 4, 6), dim=dim)
        assert torch.equal(gathered, torch.cat(every, dim=dim))

    for dim in (0, 1):
        scattered = comm.reduce_scatter(rank_tensor(rank, 4, 6), dim=dim)
        assert torch.equal(scattered, total.chunk(WORLD_SIZE, dim=dim)[rank])
    try:
        comm.reduce_scatter(rank_tensor(rank, 3, 5), dim=0)
    except ValueError as error:
        assert "divisible" in str(error)
    else:
        raise AssertionError("reduce_scatter of 3 rows over 2 ranks must be refused")

    tensor = rank_tensor(rank, 5)
    assert comm.broadcast(tensor, src=1) is tensor
    assert torch.equal(tensor, rank_tensor(1, 5))


def check_point_to_point(comm: GlooCommunicator, rank: int) -> None:
    peer = 1 - rank
    for sender in (0, 1):
        if rank == sender:
            comm.send(rank_tensor(rank, 3, 2), dst=peer)
        else:
            buffer = torch.zeros(3, 2)
            assert comm.recv(buffer, src=peer) is buffer
            assert torch.equal(buffer, rank_tensor(peer, 3, 2))


def check_group_ranks_map_to_global_ranks(rank: int) -> None:
    # A group holding only global rank 1, where it is group rank 0.
    group = dist.new_group(ranks=[1])
    if rank != 1:
        return
    comm = GlooCommunicator(GroupInfo(group, 0, 1, torch.device("cpu")))
    assert comm.global_rank(0) == 1
    tensor = rank_tensor(rank, 4)
    assert torch.equal(comm.broadcast(tensor, src=0), rank_tensor(1, 4))
    assert torch.equal(comm.all_gather(tensor), tensor)


@pytest.mark.slow
def test_gloo_collectives_across_two_processes() -> None:
    context = mp.spawn(worker, args=(free_port(),), nprocs=WORLD_SIZE, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"gloo workers did not finish within {TIMEOUT_S} s")


def test_refuses_a_non_cpu_device() -> None:
    with pytest.raises(ValueError, match="cpu"):
        GlooCommunicator(GroupInfo(None, 0, 1, torch.device("meta")))
