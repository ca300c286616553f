"""Hook specifications: the contract between kvplane's core and platform plugins.

A platform is a Python module registered in the entry-point group ``kvplane.platforms``.
It declares the plugin API it was built for as ``KVPLANE_PLUGIN_API = "1.3"`` and
implements some of the hooks below with ``@kvplane.plugins.hookimpl``. Each platform gets
its own :class:`pluggy.PluginManager`; the core's reference implementations are registered
in it as a built-in plugin with ``trylast=True``, so whatever a platform leaves out falls
back to plain torch (logged once per hook or op).

Hooks are called at start-up only (probing, model construction, KV-cache sizing); the
per-step path calls the objects they returned, never the hooks.

Arguments are frozen dataclasses from :mod:`kvplane.plugins.types`; new fields are only
ever added with defaults, so an implementation written for API 1.0 keeps working on 1.x.

Plugin API version history:

- **1.0**: first version.
- **1.1**: op ``fused_moe`` (mixture-of-experts). A 1.0 plugin still loads: it does not
  offer the op, so the reference serves it.
- **1.2**: decode graphs. The engine captures decode steps through
  :func:`kvplane_graph_runner` when the platform lists ``capabilities.GRAPH_CAPTURE`` and
  every layer's attention backend sets ``supports_graph_capture`` (see
  :class:`~kvplane.attention.backend.AttentionBackend`); ``rotary_embedding`` may rotate
  in place. A 1.1 plugin still loads: its backends default to ``supports_graph_capture =
  False``, so its steps run eagerly.
- **1.3**: mixed-step graphs. :func:`kvplane_graph_runner` is called once more, with
  ``GraphCaptureRequest.step_kind == "mixed"``, for small steps that are not pure decodes
  (buckets count tokens; ``max_query_len`` is an upper bound and padding sequences may
  have no token). A 1.2 platform's runner captures them too unless it returns ``None``
  for that kind.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import torch

    from kvplane.attention.backend import AttentionBackend
    from kvplane.distributed.communicator import Communicator
    from kvplane.engine.graph_runner import GraphRunner
    from kvplane.plugins.types import (
        AttentionSpec,
        BlockCopyRequest,
        DeviceQuery,
        GraphCaptureRequest,
        GroupInfo,
        KVCacheSpec,
        LayerQuantSpec,
        MemoryInfo,
        MemoryProfile,
        MemoryProfileRequest,
        OpsQuery,
        PlatformInfo,
        ProbeResult,
    )
    from kvplane.quantization.base import QuantMethod

PROJECT_NAME = "kvplane"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)

# --------------------------------------------------------------------------------------
# Platform probe and identity (called at discovery, by `kvplane platforms` and selection)
# --------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def kvplane_platform_probe() -> ProbeResult:
    """Say whether this platform can run on this machine, and how well.

    Called once per process for every discovered platform, before one is selected, so it
    must be cheap and must not initialise a device context it cannot release (query a
    driver, count devices; do not allocate).

    :return: a :class:`ProbeResult`. ``available=False`` must come with a ``reason`` a
        user can act on ("no NVIDIA driver found", "torch built without CUDA").
        Exceptions are caught and reported as the platform's error, never swallowed.

    Stops at first non-None result. **Required.**

    .. versionadded:: 1.0
    """


@hookspec(firstresult=True)
def kvplane_platform_info() -> PlatformInfo:
    """Describe the selected platform: device type, device count, dtypes, capabilities.

    Called once after selection (and by ``kvplane platforms`` for available platforms).

    :return: a :class:`PlatformInfo`. ``capabilities`` holds flags from
        :mod:`kvplane.plugins.capabilities`; the core asks these, never the name.

    Stops at first non-None result. **Required.**

    .. versionadded:: 1.0
    """


@hookspec(firstresult=True)
def kvplane_device_memory(query: DeviceQuery) -> MemoryInfo:
    """Report total and free memory of device ``query.device_index``, in bytes.

    Called at start-up, for KV-cache sizing and for diagnostics.

    Stops at first non-None result. **Required.**

    .. versionadded:: 1.0
    """


# --------------------------------------------------------------------------------------
# Model construction (called while the model is built, once per layer or once in total)
# --------------------------------------------------------------------------------------


@hookspec
def kvplane_ops(query: OpsQuery) -> Mapping[str, Callable[..., object]]:
    """Return this platform's implementations of ops, keyed by stable op name.

    Called once at start-up. Every name in :data:`kvplane.ops.OP_NAMES` has a reference
    implementation in :mod:`kvplane.ops.reference` with the signature and semantics a
    platform op must match (the conformance kit checks it). Names a platform leaves out
    use the reference, with one log line each. Unknown names are an error.

    :return: a mapping of op name to callable; the platform's entries override the
        reference's.

    Results of all implementations are merged. **Optional.**

    .. versionadded:: 1.0
    .. versionchanged:: 1.1 op ``fused_moe``.
    """


@hookspec
def kvplane_attention_backends(spec: AttentionSpec) -> Sequence[AttentionBackend]:
    """Offer attention backends for a layer described by ``spec``.

    Called once per distinct attention spec while the model is built. The core collects
    the candidates of every implementation (the reference offers one of priority
    ``-1000``), drops those whose ``cannot_serve(spec)`` gives a reason (logging it), and
    uses the highest priority of the rest.

    :return: candidate backends, in any order.

    Results of all implementations are merged. **Optional**, but it is the first hook a
    new platform should implement: everything else has a usable reference.

    .. versionadded:: 1.0
    """


@hookspec
def kvplane_quant_methods(spec: LayerQuantSpec) -> Sequence[QuantMethod]:
    """Offer quantization methods for a linear layer.

    Called once per linear layer while the model is built. The core keeps candidates
    whose ``name`` equals ``spec.method`` and whose ``can_implement(spec)`` is true, and
    uses the highest priority; if none is left, start-up fails listing every reason.

    :return: candidate methods, in any order.

    Results of all implementations are merged. **Optional** (the reference offers
    ``"none"``, the unquantized float layer).

    .. versionadded:: 1.0
    """


@hookspec(firstresult=True)
def kvplane_communicator(group: GroupInfo) -> Communicator:
    """Build a communicator for an initialised process group.

    Called once per group when a distributed engine starts.

    :return: a :class:`Communicator`; the reference wraps ``torch.distributed``.

    Stops at first non-None result. **Optional.**

    .. versionadded:: 1.0
    """


# --------------------------------------------------------------------------------------
# KV cache: sizing, allocation and block copies
# --------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def kvplane_profile_memory(request: MemoryProfileRequest) -> MemoryProfile:
    """Measure the memory a forward pass of the largest batch needs.

    Called once after the weights are loaded, when the KV cache is sized from
    ``gpu_memory_utilization`` (not when ``kv_cache_memory_bytes`` is given). The
    implementation calls ``request.run_forward()`` and measures around it.

    Stops at first non-None result. **Optional** (the reference measures process RSS).

    .. versionadded:: 1.0
    """


@hookspec(firstresult=True)
def kvplane_allocate_kv_cache(spec: KVCacheSpec) -> torch.Tensor:
    """Allocate the KV cache of one attention layer.

    Called once per layer at start-up.

    :return: a tensor of shape ``spec.shape`` and dtype ``spec.dtype`` on
        ``spec.device``; contents need not be initialised.

    Stops at first non-None result. **Optional.**

    .. versionadded:: 1.0
    """


@hookspec(firstresult=True)
def kvplane_copy_blocks(request: BlockCopyRequest) -> bool:
    """Copy whole blocks inside every layer's cache (copy-on-write of shared blocks).

    Called by the model runner before a step whose scheduler output lists copies.

    :return: ``True`` once done.

    Stops at first non-None result. **Optional.**

    .. versionadded:: 1.0
    """


# --------------------------------------------------------------------------------------
# Execution
# --------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def kvplane_graph_runner(request: GraphCaptureRequest) -> GraphRunner:
    """Return a runner that captures and replays fixed-shape steps (e.g. CUDA graphs).

    Called at start-up, after the KV cache is allocated, when the platform lists
    ``capabilities.GRAPH_CAPTURE``, the user did not ask for ``enforce_eager`` and every
    layer of the model (its attention backend first) sets ``supports_graph_capture``:
    once per family of steps, ``request.step_kind`` ``"decode"`` (buckets = sequences)
    then ``"mixed"`` (buckets = tokens; since 1.3). Return a new runner per call. The
    engine then calls ``runner.run(bucket, step)`` once per bucket in
    ``request.batch_sizes`` (largest first: capture) and on every step padded to a
    bucket (replay); ``step`` reads only static device buffers and returns the hidden
    states. See :mod:`kvplane.engine.step_graphs` for what a captured step's metadata
    holds (``max_query_len`` and ``max_seq_len`` are upper bounds, padding sequences).

    Return ``None`` when the platform cannot capture; the reference runs every step
    eagerly. Stops at first non-None result. **Optional.**

    .. versionadded:: 1.0
    .. versionchanged:: 1.2 called by the engine for decode steps.
    .. versionchanged:: 1.3 called a second time for small mixed steps.
    """
