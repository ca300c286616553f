"""kvplane's CPU platform: plain torch on the host, tuned for throughput.

The entry point ``kvplane.platforms: cpu`` names :mod:`kvplane_cpu.plugin`; the other
modules hold the implementations its hooks return.
"""

__version__ = "0.1.0"
