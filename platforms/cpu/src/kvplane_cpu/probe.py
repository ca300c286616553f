"""Whether this machine can run the CPU platform (always), and what it has."""

from __future__ import annotations

import os

import psutil
import torch

from kvplane.plugins.types import ProbeResult

#: Below any accelerator's score: the CPU is chosen only when nothing better is there.
PROBE_SCORE = 10


def probe() -> ProbeResult:
    """Always available; the reason says what the host has (cheap: no allocation)."""
    return ProbeResult(available=True, score=PROBE_SCORE, reason=describe())


def describe() -> str:
    """ "N CPU cores, X GiB RAM, T threads", for the probe's reason and
    ``PlatformInfo.description``."""
    num_cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    num_cores = num_cores or os.cpu_count() or 1
    total_gib = psutil.virtual_memory().total / 2**30
    return f"{num_cores} CPU cores, {total_gib:.1f} GiB RAM, {torch.get_num_threads()} threads"
