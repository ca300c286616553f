"""Set-up shared by the whole test suite: no model hub, and the Triton interpreter fix."""

from __future__ import annotations

import importlib.util
import os

# Tests never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


if os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None:
    # The CUDA kernels (and the benchmarks' probes) loop to bounds read from device
    # memory, which Triton 3.6's interpreter mishandles; the CUDA platform's emulation
    # carries the fix, applied here for tests that call the kernels directly.
    from kvplane_cuda.emulation import patch_interpreter_loop_bounds

    patch_interpreter_loop_bounds()


#: Files that take half a minute or more on a 2-core machine, longest first (measured
#: on the two workers; a file that starts a worker's main test server or SmolLM2 engine
#: pays for it). They are collected first, so that the two workers of scripts/test.sh
#: (pytest-xdist, a file at a time, in collection order: ``--no-loadscope-reorder``,
#: since xdist would otherwise start the files with the most tests first) start them
#: early instead of one worker running them alone at the end.
LONG_FILES = (
    "tests/platforms/cuda/test_cuda_graph_engine.py",
    "tests/core/engine/test_greedy_matches_transformers.py",
    "tests/core/spec_decode/test_smollm2.py",
    "tests/platforms/cuda/test_cuda_decode_attention.py",
    "tests/core/server/test_chat_forced_calls.py",
    "tests/core/server/test_chat.py",
    "tests/core/engine/test_async_scheduling.py",
    "tests/core/server/test_fuzz.py",
    "tests/core/server/test_openapi.py",
    "tests/core/server/test_engine_failures.py",
    "tests/core/server/test_lifecycle.py",
    "tests/platforms/cuda/test_cuda_sampling.py",
)


def pytest_collection_modifyitems(items: list) -> None:
    def rank(item: object) -> int:
        path = str(getattr(item, "path", ""))
        for index, name in enumerate(LONG_FILES):
            if path.endswith(name):
                return index
        return len(LONG_FILES)

    items.sort(key=rank)  # stable: the order within a file and among the rest is kept
