"""Emulated CUDA: the platform's Triton kernels in Triton's interpreter on host tensors.

Selected with ``KVPLANE_EMULATE=cuda`` (or ``--emulate cuda``) on a host without an
NVIDIA GPU, so that the kernels, the attention backend and the engine around them run
(slowly, on small shapes) where we develop and test. The hooks below are registered
above :mod:`kvplane_cuda.plugin` and answer only where the hardware is missing: tensors
live on the host (``device_type="cpu"``), memory is the host's, collectives go through
gloo, and nothing is captured. The attention backend and the ops are the CUDA
platform's own Triton kernels.

What only the hardware can verify: speed, bfloat16, CUDA graphs and streams, NCCL, and
kernel behaviour the interpreter does not model (shared-memory limits, register pressure,
``num_warps`` / ``num_stages`` and compilation for a real target).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

import torch

from kvplane.distributed.communicator import Communicator
from kvplane.distributed.torch_communicator import TorchDistributedCommunicator
from kvplane.plugins import capabilities, hookimpl
from kvplane.plugins.host import host_memory, profile_host_memory
from kvplane.plugins.types import (
    DeviceQuery,
    Emulation,
    GroupInfo,
    MemoryInfo,
    MemoryProfile,
    MemoryProfileRequest,
    OpsQuery,
    PlatformInfo,
)
from kvplane_cuda.ops import cuda_ops
from kvplane_cuda.probe import PROBE_SCORE

DESCRIPTION = "Triton kernels in the Triton interpreter on host tensors"
#: KV cache of an emulated platform: the interpreter runs small shapes only.
KV_CACHE_BYTES = 256 << 20
#: The environment switch Triton reads when a kernel is decorated.
INTERPRET_ENV = "TRITON_INTERPRET"


def emulation() -> Emulation:
    """The answer of :func:`kvplane_cuda.plugin.kvplane_emulation`."""
    if importlib.util.find_spec("triton") is None:
        return Emulation(DESCRIPTION, available=False, reason="triton is not installed")
    return Emulation(
        DESCRIPTION,
        score=PROBE_SCORE,
        plugin=sys.modules[__name__],
        activate=enter_interpreter,
    )


def enter_interpreter() -> None:
    """Make every kernel of :mod:`kvplane_cuda.kernels` run in Triton's interpreter.

    Triton reads its switch when a kernel is decorated, at import of the kernel's
    module, so the switch must be on before the first import; kernels already compiled
    for a GPU in this process cannot be turned into interpreted ones.
    """
    compiled = [name for name in sys.modules if name.startswith("kvplane_cuda.kernels.")]
    if compiled and os.environ.get(INTERPRET_ENV) != "1":
        raise RuntimeError(
            f"CUDA kernels were already loaded for the GPU in this process ({compiled[0]}); "
            f"set {INTERPRET_ENV}=1 or KVPLANE_EMULATE=cuda before kvplane starts"
        )
    os.environ[INTERPRET_ENV] = "1"
    patch_interpreter_loop_bounds()


def patch_interpreter_loop_bounds() -> None:
    """Let the interpreter take a loop bound read from device memory.

    Triton 3.6's interpreter turns such a bound into an int with ``int(array)`` of a
    one-element array, which numpy >= 2.4 refuses (triton-lang/triton#9171); our kernels
    loop to bounds loaded from the block tables' lengths, so each tensor's index squeezes
    first. Idempotent.
    """
    from triton.runtime import interpreter

    if getattr(interpreter._patch_lang_tensor, "_kvplane_squeezes", False):
        return
    original = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor: object, scope: Any) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_lang_tensor._kvplane_squeezes = True  # type: ignore[attr-defined]
    interpreter._patch_lang_tensor = patch_lang_tensor


# --------------------------------------------------------------------------------------
# Hooks that differ without the hardware (registered above kvplane_cuda.plugin)
# --------------------------------------------------------------------------------------


@hookimpl
def kvplane_platform_info() -> PlatformInfo:
    return PlatformInfo(
        name="cuda",
        device_type="cpu",
        device_count=1,
        # Triton 3.6's interpreter does not compute bfloat16 faithfully (it truncates
        # conversions, and bfloat16 attention drifts far from the reference): bfloat16
        # is verified on the hardware only.
        supported_dtypes=("float32", "float16"),
        # No graphs, streams or pinned staging on the host: only the hardware has them.
        # Several processes, one host "device" each, talk over gloo as the CPU's do.
        capabilities=frozenset({capabilities.MULTI_DEVICE}),
        distributed_backend="gloo",
        description=f"emulated: {DESCRIPTION} (torch {torch.__version__})",
        default_kv_cache_bytes=KV_CACHE_BYTES,
    )


@hookimpl
def kvplane_device_memory(query: DeviceQuery) -> MemoryInfo:
    return host_memory(query.device_index, "emulated cuda")


@hookimpl
def kvplane_ops(query: OpsQuery) -> Mapping[str, Callable[..., Any]]:
    return cuda_ops()


@hookimpl
def kvplane_communicator(group: GroupInfo) -> Communicator:
    return TorchDistributedCommunicator(group)


@hookimpl
def kvplane_profile_memory(request: MemoryProfileRequest) -> MemoryProfile:
    return profile_host_memory(request)
