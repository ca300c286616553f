"""``kvplane bench throughput`` with the CUDA caching allocator's counters printed at exit.

Whether the allocator maps new memory during a run (``num_device_alloc``), gives cached
memory back (``num_device_free``, which waits for the device) or retries after running
out (``num_alloc_retries``) shows whether steps stall on allocation. The counters cover
the whole process (start-up and warm-up included); compare runs, not absolute values.

Usage on the GPU machine (the arguments after ``--`` go to ``bench throughput``)::

    python3 benchmarks/gpu/allocator_stats.py -- --dummy qwen3-0.6b --device cuda \\
        --max-model-len 4096 --input-len 1024 --output-len 128 --num-prompts 500
"""

from __future__ import annotations

import atexit
import runpy
import sys

COUNTERS = (
    "num_alloc_retries",
    "num_device_alloc",
    "num_device_free",
    "num_sync_all_streams",
    "reserved_bytes.all.peak",
    "allocated_bytes.all.peak",
)


def print_counters() -> None:
    import torch

    if not torch.cuda.is_initialized():
        print("ALLOCATOR no CUDA context in this process", flush=True)
        return
    stats = torch.cuda.memory_stats()
    counters = {name: stats.get(name) for name in COUNTERS}
    free, total = torch.cuda.mem_get_info()
    print(f"ALLOCATOR {counters} free {free} of {total}", flush=True)


def main(argv: list[str]) -> None:
    bench_args = argv[argv.index("--") + 1 :] if "--" in argv else argv
    atexit.register(print_counters)
    sys.argv = ["kvplane", "bench", "throughput", *bench_args]
    runpy.run_module("kvplane.cli.main", run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
