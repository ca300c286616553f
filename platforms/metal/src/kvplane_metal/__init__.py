"""kvplane's Apple silicon platform: torch's MPS backend on the Mac's unified memory.

The entry point ``kvplane.platforms: metal`` names :mod:`kvplane_metal.plugin`; the
other modules hold the implementations its hooks return.
"""

__version__ = "0.1.0"
