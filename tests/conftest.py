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
