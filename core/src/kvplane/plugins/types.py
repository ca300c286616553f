"""Frozen dataclasses that cross the hook boundary.

Every hook argument and every hook result that is a record lives here. They are frozen so
a plugin cannot mutate the core's state through them, and they only ever *grow*: a field
added in a minor API version always has a default, so a plugin written against an older
minor version keeps working.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


# --------------------------------------------------------------------------------------
# Identity and probing
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """Answer of :func:`kvplane_platform_probe`: can this platform run here, and how well.

    ``score`` ranks available platforms when the user names none: the highest wins.
    ``reason`` says why the platform is unavailable (or, when available, what was found).
    """

    available: bool
    score: int = 0
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Emulation:
    """Answer of :func:`kvplane_emulation`: how this platform runs on a host without its
    hardware (since 1.4).

    ``description`` says how, for ``kvplane platforms`` ("Triton kernels in the Triton
    interpreter on host tensors"). ``available`` is false when this host cannot emulate
    it either, with ``reason`` saying what is missing ("pip install triton"). ``score``
    ranks the emulated platform like a probe's score. ``plugin`` holds hook
    implementations registered above the platform's own while it is emulated: they
    answer the hooks that differ without the hardware (identity, memory, ops for host
    tensors). ``activate`` is called once when the emulated platform is selected, before
    any hook but the probe and this one, to switch the emulation on (it may change
    process-wide state, such as Triton's interpreter switch).
    """

    description: str
    available: bool = True
    reason: str = ""
    score: int = 0
    plugin: object | None = None
    activate: Callable[[], None] | None = None


@dataclass(frozen=True, slots=True)
class PlatformInfo:
    """Identity and static capabilities of a platform.

    ``device_type`` is the torch device type tensors live on (``"cpu"``, ``"cuda"``, a
    PrivateUse1 name, ...). ``capabilities`` holds semantic flags the core may ask about
    (see :mod:`kvplane.plugins.capabilities`); the core never asks for a platform's name.
    """

    name: str
    device_type: str
    device_count: int
    #: Model dtypes the platform runs, preferred first: ``dtype="auto"`` falls back to
    #: the first for a checkpoint dtype not listed.
    supported_dtypes: tuple[str, ...] = ("float32",)
    capabilities: frozenset[str] = frozenset()
    distributed_backend: str = "gloo"
    description: str = ""
    #: KV-cache size to use when the user sets neither ``kv_cache_memory_bytes`` nor
    #: asks for profiling (platforms whose "device memory" is the host's, like CPU).
    default_kv_cache_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class DeviceQuery:
    """Argument of :func:`kvplane_device_memory`: which device to ask about."""

    device_index: int = 0


@dataclass(frozen=True, slots=True)
class MemoryInfo:
    """Total and currently free memory of one device, in bytes."""

    total_bytes: int
    free_bytes: int


# --------------------------------------------------------------------------------------
# Memory profiling and KV cache
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MemoryProfileRequest:
    """Argument of :func:`kvplane_profile_memory`.

    ``run_forward`` runs the largest step the engine will schedule: a forward pass of
    ``max_num_batched_tokens`` tokens, the logits of ``max_num_seqs`` rows and their
    sampling; the platform measures what it costs on top of the weights.
    """

    device: "torch.device"
    run_forward: Callable[[], None]


@dataclass(frozen=True, slots=True)
class MemoryProfile:
    """Result of memory profiling, in bytes.

    ``total_bytes`` is the device's capacity, ``used_bytes`` what is in use after the
    weights were loaded (before the profile run) and ``peak_activation_bytes`` the peak
    extra memory the profile run needed. The core sizes the KV cache as
    ``total * gpu_memory_utilization - used - peak_activation``.
    """

    total_bytes: int
    used_bytes: int
    peak_activation_bytes: int


@dataclass(frozen=True, slots=True)
class KVCacheSpec:
    """Argument of :func:`kvplane_allocate_kv_cache`: the cache of one attention layer.

    The layout every backend reads is ``[2, num_blocks, block_size, num_kv_heads,
    head_size]`` (index 0 keys, 1 values); a *slot* is ``block * block_size + offset``.
    """

    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_size: int
    dtype: "torch.dtype"
    device: "torch.device"

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        return (2, self.num_blocks, self.block_size, self.num_kv_heads, self.head_size)

    @property
    def bytes_per_block(self) -> int:
        import torch

        element_size = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.block_size * self.num_kv_heads * self.head_size * element_size


@dataclass(frozen=True, slots=True)
class BlockCopyRequest:
    """Argument of :func:`kvplane_copy_blocks`: copy whole blocks inside every layer cache.

    ``src_block_ids[i]`` is copied onto ``dst_block_ids[i]`` in each tensor of
    ``kv_caches`` (used for copy-on-write of shared blocks).
    """

    kv_caches: "tuple[torch.Tensor, ...]"
    src_block_ids: tuple[int, ...]
    dst_block_ids: tuple[int, ...]


# --------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AttentionSpec:
    """What one attention layer needs from a backend.

    ``sliding_window`` limits each query to the last ``sliding_window`` keys (itself
    included); ``logit_softcap`` applies ``cap * tanh(scores / cap)`` before softmax.
    """

    num_heads: int
    num_kv_heads: int
    head_size: int
    dtype: "torch.dtype"
    block_size: int
    scale: float
    sliding_window: int | None = None
    logit_softcap: float | None = None
    kv_cache_dtype: "torch.dtype | None" = None


# --------------------------------------------------------------------------------------
# Quantization
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LayerQuantSpec:
    """A linear layer to be quantized: ``y = x @ W.T + b`` with ``W: [output_size,
    input_size]``. ``method`` is the name the user or checkpoint asked for; ``options``
    the checkpoint's layout for it (:mod:`kvplane.quantization.config`; empty: float
    weights, quantized at load). ``output_sizes`` (since 1.5) are the stacked matrices'
    row counts (Q, K, V), which per-matrix scales follow; empty means one matrix."""

    method: str
    input_size: int
    output_size: int
    params_dtype: "torch.dtype"
    has_bias: bool = False
    options: tuple[tuple[str, Any], ...] = ()
    output_sizes: tuple[int, ...] = ()

    @property
    def shard_sizes(self) -> tuple[int, ...]:
        """``output_sizes``, or the one matrix's ``(output_size,)``."""
        return self.output_sizes or (self.output_size,)


@dataclass(frozen=True, slots=True)
class ExpertQuantSpec:
    """The experts of a mixture-of-experts layer to be quantized (since 1.6):
    ``num_experts`` gated MLPs ``down(act(gate(x)) * up(x))``, each with a gate and an up
    matrix ``[intermediate_size, hidden_size]`` and a down matrix ``[hidden_size,
    intermediate_size]``, without biases. ``method`` and ``options`` as in
    :class:`LayerQuantSpec`; the router is never part of it (it stays in float)."""

    method: str
    num_experts: int
    hidden_size: int
    intermediate_size: int
    params_dtype: "torch.dtype"
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def gate_up(self) -> LayerQuantSpec:
        """One expert's gate and up matrices as one stacked linear layer (``output_sizes``
        ``(intermediate_size, intermediate_size)``: gate rows, then up rows)."""
        sizes = (self.intermediate_size, self.intermediate_size)
        return LayerQuantSpec(
            self.method,
            self.hidden_size,
            sum(sizes),
            self.params_dtype,
            options=self.options,
            output_sizes=sizes,
        )

    @property
    def down(self) -> LayerQuantSpec:
        """One expert's down matrix as a linear layer."""
        return LayerQuantSpec(
            self.method,
            self.intermediate_size,
            self.hidden_size,
            self.params_dtype,
            options=self.options,
        )


# --------------------------------------------------------------------------------------
# Communication
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GroupInfo:
    """Argument of :func:`kvplane_communicator`: one initialised torch.distributed group."""

    group: Any
    rank: int
    world_size: int
    device: "torch.device"


# --------------------------------------------------------------------------------------
# Ops and graph capture
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OpsQuery:
    """Argument of :func:`kvplane_ops`: the device the ops will run on."""

    device_type: str


@dataclass(frozen=True, slots=True)
class GraphCaptureRequest:
    """Argument of :func:`kvplane_graph_runner`.

    ``bucket_sizes`` are the buckets the engine wants captured, ascending (since 1.4; was
    ``batch_sizes``). ``step_kind`` says what a bucket counts (since 1.3): ``"decode"``
    steps (one token per sequence) are bucketed by sequences, ``"mixed"`` steps (prefill
    chunks with decodes) by tokens; a platform may return ``None`` for a kind it does not
    want captured. (1.4 renamed ``batch_sizes`` and retired ``enabled``, which was always
    true since under ``enforce_eager`` the hook is not called; both stay readable as
    deprecated aliases until 2.0.)
    """

    device: "torch.device"
    bucket_sizes: tuple[int, ...] = field(default_factory=tuple)
    step_kind: str = "decode"

    # Read-only aliases for plugins written before 1.4, which the 1.x promise keeps
    # working; removed in 2.0.

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        """Deprecated name of :attr:`bucket_sizes` (before 1.4)."""
        return self.bucket_sizes

    @property
    def enabled(self) -> bool:
        """Deprecated (before 1.4): always true, since the hook is not called otherwise."""
        return True
