"""Hook specifications: the contract between kvplane's core and platform plugins.

A platform is a Python module registered in the entry-point group ``kvplane.platforms``.
It declares the plugin API it was built for as ``KVPLANE_PLUGIN_API = "1.6"`` and
implements some of the hooks below with ``@kvplane.plugins.hookimpl``. Each platform gets
its own :class:`pluggy.PluginManager`; the core's reference implementations
(:mod:`kvplane.plugins.reference`) are registered in it as a built-in plugin with
``trylast=True``, so whatever a platform leaves out falls back to plain torch (named in
the start-up log).

Every spec's docstring follows one template, which ``docs/plugins.md``'s hook table is
generated from (:mod:`kvplane.plugins.spec_table`): a one-line summary, when the core
calls it, one ``:param`` per argument, ``:returns:`` (``| None`` in the signature where
``None`` is allowed and what it means), how results combine ("Stops at first non-None
result" for ``firstresult`` hooks, "Results of all implementations are merged"
otherwise), ``Implemented by:`` (who must or may implement it) and the version notes.

Hooks are called at start-up (probing, model construction, KV-cache sizing), and the
per-step path calls the objects they returned; the one exception is
:func:`kvplane_copy_blocks`, called before a step that copies blocks. Arguments are frozen
dataclasses from :mod:`kvplane.plugins.types`; new fields are only ever added with
defaults, and an implementation may declare fewer arguments than its spec, so an
implementation written for API 1.0 keeps working on 1.x.

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
- **1.4**: platform emulation, :func:`kvplane_emulation`. ``GraphCaptureRequest`` names
  its buckets ``bucket_sizes`` and retires ``enabled`` (never false: under
  ``enforce_eager`` the hook is not called); ``batch_sizes`` and ``enabled`` stay as
  read-only deprecated aliases until 2.0.
  :class:`~kvplane.attention.backend.AttentionImpl` writes the cache itself and calls
  ``attend``, and ``AttentionBackend.cannot_serve`` checks the head grouping, so a
  backend keeps only its own limits. A 1.3 plugin still loads (its impls override
  ``forward``); it cannot be emulated.
- **1.5**: quantized checkpoints. ``LayerQuantSpec`` carries ``output_sizes`` (the
  stacked matrices) and the checkpoint's layout in ``options``
  (:mod:`kvplane.quantization.config`); methods register parameters with
  :func:`~kvplane.quantization.params.register_param`. The reference offers torch
  ``fp8`` and ``int8`` to every platform (a logged fallback). FP8 KV cache
  (``kv_cache_dtype="fp8"``): ``AttentionSpec.kv_cache_dtype`` and ``KVCacheSpec.dtype``
  may be ``float8_e4m3fn``; only backends that set ``supports_fp8_kv_cache`` are given
  such a cache (selection and the base ``cannot_serve`` refuse it otherwise), and their
  cache writer
  (``reshape_and_cache``) takes ``k_scale`` and ``v_scale``. A 1.4 plugin still loads:
  its backends decline FP8 caches, which the reference serves.
- **1.6**: quantized mixture-of-experts experts. :func:`kvplane_quant_methods` is also
  called once per mixture-of-experts layer, with ``spec`` describing one expert's gate/up
  matrix (:attr:`~kvplane.plugins.types.ExpertQuantSpec.gate_up`); the core then asks
  each candidate's ``can_implement_experts`` (:class:`~kvplane.quantization.base.QuantMethod`
  gains the ``*_experts`` hooks, with defaults). The core's ``fp8``, ``int8``, ``gptq``
  and ``awq`` run experts as per-expert linear layers through their own ``apply``, so a
  platform subclass that replaces a product (``scaled_matmul``, ``matmul``) runs it for
  experts too. A 1.5 plugin still loads: methods that subclass the core's inherit expert
  support, others refuse experts (an error naming the layer, at start-up).
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
    from kvplane.plugins import types
    from kvplane.quantization.base import QuantMethod

PROJECT_NAME = "kvplane"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)

# --------------------------------------------------------------------------------------
# Platform probe and identity (called at discovery, by `kvplane platforms` and selection)
# --------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def kvplane_platform_probe() -> types.ProbeResult | None:
    """Say whether this platform can run on this machine, and how well.

    Called once per process for every discovered platform, before one is selected, by
    selection and by ``kvplane platforms``. It must be cheap and must not initialise a
    device context it cannot release (query a driver, count devices; do not allocate).
    Exceptions are caught and shown as the platform's error, never swallowed. Not called
    for a platform that is emulated (:func:`kvplane_emulation` answers instead).

    :returns: a :class:`~kvplane.plugins.types.ProbeResult`; ``available=False`` comes
        with a ``reason`` a user can act on ("no NVIDIA driver found", "torch built
        without CUDA"). ``None`` (no implementation) makes the platform unavailable.

    Stops at first non-None result.

    Implemented by: every platform (**required**).

    .. versionadded:: 1.0
    """


@hookspec(firstresult=True)
def kvplane_platform_info() -> types.PlatformInfo | None:
    """Describe the platform: device type, device count, dtypes, capabilities.

    Called once after selection, and by ``kvplane platforms`` for each available
    platform.

    :returns: a :class:`~kvplane.plugins.types.PlatformInfo`. ``capabilities`` holds
        flags from :mod:`kvplane.plugins.capabilities`: the core asks these, never the
        platform's name.

    Stops at first non-None result.

    Implemented by: every platform (**required**).

    .. versionadded:: 1.0
    """


@hookspec(firstresult=True)
def kvplane_device_memory(query: types.DeviceQuery) -> types.MemoryInfo | None:
    """Report the total and free memory of one device, in bytes.

    Called at start-up, for KV-cache sizing and for diagnostics.

    :param query: which device (``query.device_index``, local to this process).
    :returns: a :class:`~kvplane.plugins.types.MemoryInfo`; raise ``ValueError`` for an
        index the platform does not have.

    Stops at first non-None result.

    Implemented by: every platform (**required**).

    .. versionadded:: 1.0
    """


@hookspec(firstresult=True)
def kvplane_emulation() -> types.Emulation | None:
    """Say how this platform can run on a host without its hardware.

    Called like the probe (cheaply, with no side effects) for every platform, by
    selection and ``kvplane platforms``; when the user asks to emulate the platform
    (``KVPLANE_EMULATE=name``, ``--emulate name``), the answer replaces the probe: the
    platform is available with ``reason`` "emulated: <description>", its ``plugin`` is
    registered above the platform's own module, and ``activate`` runs once when it is
    selected. Emulation is for developing and testing a platform where its hardware is
    missing (CI, laptops); it must compute what the hardware computes, not fake it.

    :returns: an :class:`~kvplane.plugins.types.Emulation` (``available=False`` with a
        ``reason`` when this host lacks what the emulation needs), or ``None`` when the
        platform cannot be emulated.

    Stops at first non-None result.

    Implemented by: platforms that can run without their hardware (optional; the
    reference has none, so a platform without it cannot be emulated).

    .. versionadded:: 1.4
    """


# --------------------------------------------------------------------------------------
# Model construction (called while the model is built, once per layer or once in total)
# --------------------------------------------------------------------------------------


@hookspec
def kvplane_ops(query: types.OpsQuery) -> Mapping[str, Callable[..., object]]:
    """Return this platform's implementations of ops, keyed by stable op name.

    Called once at start-up. Every name in :data:`kvplane.ops.OP_NAMES` has a reference
    implementation in :mod:`kvplane.ops.reference` with the signature and semantics a
    platform op must match (the conformance kit checks it). Names a platform leaves out
    use the reference (named in one log line); unknown names are an error.

    :param query: the device type the ops will run on (``query.device_type``).
    :returns: a mapping of op name to callable; the platform's entries override the
        reference's. An empty mapping offers nothing.

    Results of all implementations are merged.

    Implemented by: platforms with faster ops than plain torch (optional; the reference
    offers every op).

    .. versionadded:: 1.0
    .. versionchanged:: 1.1 op ``fused_moe``.
    .. versionchanged:: 1.5 ``reshape_and_cache`` takes ``k_scale`` and ``v_scale`` and
        quantizes into a ``float8_e4m3fn`` cache.
    """


@hookspec
def kvplane_attention_backends(spec: types.AttentionSpec) -> Sequence[AttentionBackend]:
    """Offer attention backends for a layer described by ``spec``.

    Called once per distinct attention spec while the model is built. The core collects
    the candidates of every implementation (the reference offers one of priority
    ``-1000``), drops those whose ``cannot_serve(spec)`` gives a reason (logging it), and
    uses the highest priority of the rest.

    :param spec: heads, head size, dtype, block size, scale, sliding window, soft-cap,
        and the cache's dtype (``kv_cache_dtype``; ``None``: ``dtype``). A
        ``float8_e4m3fn`` cache holds ``x / scale`` with per-layer scales: a backend that
        reads it sets ``supports_fp8_kv_cache`` (selection refuses it to the others, so
        the reference serves such layers, and logs why).
    :returns: candidate backends, in any order (empty: none).

    Results of all implementations are merged.

    Implemented by: every platform that computes on a device (optional, but the first
    hook a new platform writes: everything else has a usable reference).

    .. versionadded:: 1.0
    .. versionchanged:: 1.5 ``spec.kv_cache_dtype`` may be ``float8_e4m3fn`` (FP8 KV
        cache), for backends that set ``supports_fp8_kv_cache``.
    """


@hookspec
def kvplane_quant_methods(spec: types.LayerQuantSpec) -> Sequence[QuantMethod]:
    """Offer quantization methods for a linear layer.

    Called once per linear layer while the model is built, and once per
    mixture-of-experts layer whose experts are quantized, with ``spec`` describing one
    expert's gate/up matrix (``ExpertQuantSpec.gate_up``). The core keeps candidates
    whose ``name`` equals ``spec.method`` and whose ``can_implement(spec)`` (for experts:
    ``can_implement_experts(expert_spec)``) is true, and uses the highest priority; if
    none is left, start-up fails listing every reason (for experts, naming the layer).
    A method must read every layout ``spec.options`` can name
    (:mod:`kvplane.quantization.config`: a float checkpoint quantized at load, or the
    checkpoint's own tensors) or refuse it in ``can_implement``.

    :param spec: the layer's sizes (``output_sizes``: the stacked matrices), dtype, bias,
        the method the user or checkpoint asked for and the checkpoint's layout options.
    :returns: candidate methods, in any order (empty: none).

    Results of all implementations are merged.

    Implemented by: platforms with quantized kernels (optional; the reference offers
    ``"none"``, the unquantized float layer, and torch versions of ``"fp8"`` and
    ``"int8"`` below any platform's priority; choosing one of those is logged as a
    fallback).

    .. versionadded:: 1.0
    .. versionchanged:: 1.5 ``spec.output_sizes`` and checkpoint layout options; the
        reference offers ``fp8`` and ``int8``.
    .. versionchanged:: 1.6 also called for the experts of mixture-of-experts layers.
    """


@hookspec(firstresult=True)
def kvplane_communicator(group: types.GroupInfo) -> Communicator | None:
    """Build a communicator for an initialised process group.

    Called once per group when a distributed engine starts.

    :param group: the ``torch.distributed`` group, this process's rank, the world size
        and the local device.
    :returns: a :class:`~kvplane.distributed.communicator.Communicator`.

    Stops at first non-None result.

    Implemented by: platforms with a faster transport than their ``torch.distributed``
    backend gives (optional; the reference wraps ``torch.distributed``).

    .. versionadded:: 1.0
    """


# --------------------------------------------------------------------------------------
# KV cache: sizing, allocation and block copies
# --------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def kvplane_profile_memory(request: types.MemoryProfileRequest) -> types.MemoryProfile | None:
    """Measure the memory a forward pass of the largest batch needs.

    Called once after the weights are loaded, when the KV cache is sized from
    ``gpu_memory_utilization`` (not when ``kv_cache_memory_bytes`` or the platform's
    ``default_kv_cache_bytes`` sizes it). The implementation calls
    ``request.run_forward()`` exactly once and measures around it; it runs the largest
    step (``max_num_batched_tokens`` tokens, logits and sampling of ``max_num_seqs``
    rows).

    :param request: the device and the forward pass to measure.
    :returns: a :class:`~kvplane.plugins.types.MemoryProfile`.

    Stops at first non-None result.

    Implemented by: platforms whose device memory is not the host's (optional; the
    reference measures the process's resident set).

    .. versionadded:: 1.0
    """


@hookspec(firstresult=True)
def kvplane_allocate_kv_cache(spec: types.KVCacheSpec) -> torch.Tensor | None:
    """Allocate the KV cache of one attention layer.

    Called once per attention layer at start-up, after the cache is sized.

    :param spec: block count and size, KV heads, head size, dtype and device. The dtype
        is the model's, or ``float8_e4m3fn`` for an FP8 KV cache (one byte an element:
        ``spec.bytes_per_block`` sizes the cache from it).
    :returns: a tensor of shape ``spec.shape`` (``[2, num_blocks, block_size,
        num_kv_heads, head_size]``) and dtype ``spec.dtype`` on ``spec.device``. Its
        contents need not be initialised: attention never reads a slot before it is
        written.

    Stops at first non-None result.

    Implemented by: platforms that place or lay out memory specially (optional; the
    reference calls ``torch.empty``).

    .. versionadded:: 1.0
    .. versionchanged:: 1.5 ``spec.dtype`` may be ``float8_e4m3fn``.
    """


@hookspec(firstresult=True)
def kvplane_copy_blocks(request: types.BlockCopyRequest) -> bool | None:
    """Copy whole blocks inside every layer's cache (copy-on-write of shared blocks).

    Called by the model runner before a step whose scheduler output lists copies.
    All sources are read before any destination is written.

    :param request: the layers' caches (of any cache dtype, ``float8_e4m3fn`` included:
        blocks are copied bit for bit) and the source and destination block ids.
    :returns: ``True`` once the copies are done. The value carries no other meaning: a
        ``firstresult`` hook goes on to the next implementation when one returns
        ``None``, so an implementation that copied must return something non-None, or
        the reference would copy the blocks a second time.

    Stops at first non-None result.

    Implemented by: platforms with a faster copy than indexing (optional; the reference
    copies with ``index_select`` / ``index_copy_``).

    .. versionadded:: 1.0
    """


# --------------------------------------------------------------------------------------
# Execution
# --------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def kvplane_graph_runner(request: types.GraphCaptureRequest) -> GraphRunner | None:
    """Return a runner that captures and replays fixed-shape steps (e.g. CUDA graphs).

    Called at start-up, after the KV cache is allocated, only when the platform lists
    ``capabilities.GRAPH_CAPTURE``, the user did not ask for ``enforce_eager`` and every
    layer of the model (its attention backend first) sets ``supports_graph_capture``:
    once per family of steps, ``request.step_kind`` ``"decode"`` (buckets count
    sequences) then ``"mixed"`` (buckets count tokens). The engine then calls
    ``runner.run(bucket, step)`` once per bucket in ``request.bucket_sizes`` (largest
    first: capture) and on every step padded to a bucket (replay); ``step`` reads only
    static device buffers and returns the hidden states. See
    :mod:`kvplane.engine.step_graphs` for what a captured step's metadata holds.

    :param request: the device, the buckets to capture and the step family.
    :returns: a new :class:`~kvplane.engine.graph_runner.GraphRunner` per call, or
        ``None`` when the platform does not capture this family (its steps then run
        eagerly).

    Stops at first non-None result.

    Implemented by: platforms that list ``capabilities.GRAPH_CAPTURE`` (**required** for
    them; the reference has none, since it is never called for other platforms).

    .. versionadded:: 1.0
    .. versionchanged:: 1.2 called by the engine for decode steps.
    .. versionchanged:: 1.3 called a second time for small mixed steps.
    .. versionchanged:: 1.4 ``request.bucket_sizes`` (``batch_sizes`` and ``enabled`` are
       deprecated aliases).
    """
