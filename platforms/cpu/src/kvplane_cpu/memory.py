"""Host memory: the default size of the KV cache.

Capacity and the profile of a forward pass are the host's, measured by the core's
:mod:`kvplane.plugins.host` (the reference profiles with it too); the KV cache is
allocated and its blocks copied by the core's reference (``torch.empty``, whose pages
the OS maps lazily, and ``index_select`` / ``index_copy_``).
"""

from __future__ import annotations

import os

import psutil

#: Environment variable overriding the default KV-cache size, in GiB.
KV_CACHE_GIB_ENV = "KVPLANE_CPU_KV_CACHE_GIB"
#: The default KV-cache size: this many GiB, at most a quarter of the host's memory.
DEFAULT_KV_CACHE_GIB = 4.0


def default_kv_cache_bytes() -> int:
    """KV-cache size when the user gives none: ``KVPLANE_CPU_KV_CACHE_GIB`` if set, else
    4 GiB capped at a quarter of host memory (sizing the cache by "free device memory"
    would claim the whole machine's RAM)."""
    value = os.environ.get(KV_CACHE_GIB_ENV)
    if value is not None:
        try:
            gib = float(value)
        except ValueError:
            raise ValueError(f"{KV_CACHE_GIB_ENV}={value!r} is not a number of GiB") from None
        if gib <= 0:
            raise ValueError(f"{KV_CACHE_GIB_ENV}={value!r} must be positive")
        return int(gib * 2**30)
    return int(min(DEFAULT_KV_CACHE_GIB * 2**30, psutil.virtual_memory().total / 4))
