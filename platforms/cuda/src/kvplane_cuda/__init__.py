"""kvplane's NVIDIA CUDA platform.

The entry point ``kvplane.platforms: cuda`` names :mod:`kvplane_cuda.plugin`, which
imports nothing that needs a GPU or Triton, so it loads (and reports itself unavailable)
on any machine.
"""

__version__ = "0.1.0"
