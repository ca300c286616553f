"""Where the CUDA platform's kernel tests run (not collected itself).

On the CPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set before
Triton is imported; ``scripts/test.sh`` exports it) on CPU tensors; on a GPU, without the
interpreter, on ``cuda``.
"""

from __future__ import annotations

import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
HAS_GPU = torch.cuda.is_available() and not INTERPRET
# The interpreter runs CPU tensors; real kernels need a GPU (and no interpreter).
DEVICES = (["cpu"] if INTERPRET else []) + (["cuda"] if HAS_GPU else [])
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device, not the interpreter")
