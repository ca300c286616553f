"""pytest plugin (``-p benchmarks.gpu.pytest_register_cuda``): registers the cuda platform
in-process, for a checkout used from source where its entry point is not installed."""

from __future__ import annotations

import kvplane_cuda.plugin as cuda_plugin
from kvplane.plugins.discovery import discover_platforms, register_platform

if "cuda" not in {platform.name for platform in discover_platforms()}:
    register_platform("cuda", cuda_plugin)
