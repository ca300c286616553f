"""Whether this machine has an Acme device, and what it has.

The probe runs for every installed platform before one is selected, so it must be cheap
and side-effect free: a real plugin asks its driver whether a device exists (count
devices, read a version), without opening a device context.
"""

from __future__ import annotations

import os

from kvplane.plugins.types import ProbeResult

#: Set to "0" to make the probe report Acme unavailable (stands in for "no driver").
AVAILABLE_ENV = "KVPLANE_ACME_AVAILABLE"

#: Highest available score wins when the user names no platform. The CPU platform
#: scores 10 and CUDA 100; this example scores below the CPU so it is only used when
#: asked for (``--device acme``). A real accelerator scores above the CPU.
PROBE_SCORE = 5


def probe() -> ProbeResult:
    """Available unless ``KVPLANE_ACME_AVAILABLE=0``; the reason says what was found."""
    if os.environ.get(AVAILABLE_ENV, "1") == "0":
        return ProbeResult(
            available=False,
            reason=f"Acme driver not found ({AVAILABLE_ENV}=0 simulates a machine without it)",
        )
    return ProbeResult(available=True, score=PROBE_SCORE, reason=describe())


def describe() -> str:
    """The Acme devices of this machine in one line (a real plugin asks its driver)."""
    return "1 Acme device (simulated)"
