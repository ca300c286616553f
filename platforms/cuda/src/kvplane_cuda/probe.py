"""Whether this machine can run the CUDA platform, and what it has.

:func:`probe` runs before any platform is selected and therefore only counts devices
(through NVML where torch can), without creating a CUDA context; :func:`describe` runs
after selection and may initialise CUDA.
"""

from __future__ import annotations

import os

import torch

from kvplane.plugins.types import ProbeResult

#: Above the CPU platform's score: a visible GPU wins unless the user names another.
PROBE_SCORE = 100


def probe() -> ProbeResult:
    """Whether torch can use an NVIDIA GPU here, without creating a CUDA context."""
    if torch.version.hip is not None:
        return ProbeResult(
            False, 0, f"torch {torch.__version__} is a ROCm (HIP) build; this plugin is for CUDA"
        )
    if torch.version.cuda is None:
        return ProbeResult(
            False,
            0,
            f"torch {torch.__version__} was built without CUDA; install a CUDA build of torch",
        )
    num_devices = torch.cuda.device_count()
    if num_devices == 0:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        hint = "" if visible is None else f"; CUDA_VISIBLE_DEVICES={visible!r}"
        return ProbeResult(
            False, 0, f"no CUDA device visible (torch.cuda.device_count() == 0){hint}"
        )
    if not torch.cuda.is_available():
        return ProbeResult(
            False,
            0,
            f"{num_devices} CUDA device(s) listed but torch.cuda.is_available() is False "
            f"(driver too old for CUDA {torch.version.cuda}?)",
        )
    return ProbeResult(
        True, PROBE_SCORE, f"{num_devices} CUDA device(s), torch CUDA {torch.version.cuda}"
    )


def describe() -> str:
    """Name and compute capability of each visible device (initialises CUDA), for
    ``PlatformInfo.description``."""
    names = []
    for index in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(index)
        names.append(f"{torch.cuda.get_device_name(index)} (sm_{major}{minor})")
    return ", ".join(names)
