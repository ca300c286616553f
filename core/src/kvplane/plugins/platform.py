"""A selected platform with its hooks resolved: what the engine holds at run time."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any, cast

import pluggy
import torch

from kvplane.attention.backend import AttentionBackend, fp8_kv_cache_refusal
from kvplane.distributed.communicator import Communicator
from kvplane.engine.graph_runner import GraphRunner
from kvplane.ops import OP_NAMES, Ops
from kvplane.plugins import hookspec, reference
from kvplane.plugins.hookspec import PROJECT_NAME
from kvplane.plugins.types import (
    AttentionSpec,
    BlockCopyRequest,
    DeviceQuery,
    Emulation,
    ExpertQuantSpec,
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

logger = logging.getLogger(__name__)

#: Hooks a platform must implement itself (the reference has none for them).
REQUIRED_HOOKS = ("kvplane_platform_probe", "kvplane_platform_info", "kvplane_device_memory")
#: Appended to a platform's name to name its emulation plugin in the plugin manager.
EMULATION_SUFFIX = ":emulation"


def make_plugin_manager(
    name: str, module: ModuleType, emulation_plugin: object | None = None
) -> pluggy.PluginManager:
    """A plugin manager holding the hook specs, the reference plugin and ``module``, and
    above them ``emulation_plugin`` when the platform is emulated.

    pluggy calls the plugin registered last first, so an emulation plugin's answers
    override the platform's own (first result) or come first (merged results).
    """
    manager = pluggy.PluginManager(PROJECT_NAME)
    manager.add_hookspecs(hookspec)
    manager.register(reference, name=reference.REFERENCE_PLUGIN_NAME)
    manager.register(module, name=name)
    if emulation_plugin is not None:
        manager.register(emulation_plugin, name=f"{name}{EMULATION_SUFFIX}")
    # A misspelled hook name would otherwise be ignored silently.
    manager.check_pending()
    return manager


def probe(manager: pluggy.PluginManager) -> ProbeResult:
    """Call the probe hook; a platform without one is unavailable."""
    result = manager.hook.kvplane_platform_probe()
    if result is None:
        return ProbeResult(False, 0, "the plugin implements no kvplane_platform_probe")
    return result


def emulation(manager: pluggy.PluginManager) -> Emulation | None:
    """Call the emulation hook: how the platform runs without its hardware, if it can."""
    return manager.hook.kvplane_emulation()


class Platform:
    """The selected platform: identity plus every hook resolved into plain objects.

    Built once per process at start-up. Its methods call hooks, so they belong to
    start-up too; the per-step path uses what they returned (``ops``, attention impls,
    quant methods, the graph runner).
    """

    def __init__(
        self, name: str, version: str, manager: pluggy.PluginManager, emulated: bool = False
    ) -> None:
        self.name = name
        self.version = version
        #: Whether the platform runs through its emulation (for logs and reports; the
        #: engine never branches on it).
        self.emulated = emulated
        self._manager = manager
        missing = [hook for hook in REQUIRED_HOOKS if not self._implements(hook)]
        if missing:
            raise ValueError(f"platform {name!r} does not implement required hooks {missing}")
        self.info: PlatformInfo = manager.hook.kvplane_platform_info()
        self._log_reference_fallbacks()
        self.ops = self._resolve_ops()
        self._attention_backends: dict[AttentionSpec, AttentionBackend] = {}
        self._noted_quant_fallbacks: set[str] = set()

    # -- identity -----------------------------------------------------------------------

    def device(self, index: int = 0) -> torch.device:
        """The torch device of local device ``index``."""
        return torch.device(self.info.device_type, index)

    def has_capability(self, flag: str) -> bool:
        return flag in self.info.capabilities

    def supports_dtype(self, dtype: torch.dtype) -> bool:
        return str(dtype).removeprefix("torch.") in self.info.supported_dtypes

    def device_memory(self, index: int = 0) -> MemoryInfo:
        return self._manager.hook.kvplane_device_memory(query=DeviceQuery(index))

    # -- model construction --------------------------------------------------------------

    def attention_backend(self, spec: AttentionSpec) -> AttentionBackend:
        """The highest-priority backend that can serve ``spec`` (cached per spec); an FP8
        cache only goes to backends that set ``supports_fp8_kv_cache``."""
        if spec in self._attention_backends:
            return self._attention_backends[spec]
        candidates = [
            backend
            for backends in self._manager.hook.kvplane_attention_backends(spec=spec)
            for backend in backends
        ]
        reasons: list[str] = []
        for backend in sorted(candidates, key=lambda b: b.priority, reverse=True):
            reason = fp8_kv_cache_refusal(backend, spec) or backend.cannot_serve(spec)
            if reason is None:
                logger.info("attention backend %r selected for %s", backend.name, spec)
                self._attention_backends[spec] = backend
                return backend
            logger.info("attention backend %r cannot serve: %s", backend.name, reason)
            reasons.append(f"{backend.name}: {reason}")
        raise ValueError(
            f"platform {self.name!r}: no attention backend can serve {spec}: {'; '.join(reasons)}"
        )

    def quant_method(self, spec: LayerQuantSpec) -> QuantMethod:
        """The highest-priority method named ``spec.method`` that can implement ``spec``."""
        return self._pick_quant_method(spec, spec.method, lambda m: m.can_implement(spec), spec)

    def expert_quant_method(self, spec: ExpertQuantSpec) -> QuantMethod:
        """The highest-priority method named ``spec.method`` whose
        ``can_implement_experts`` accepts the experts of ``spec``. The candidates are the
        methods offered for one expert's gate/up matrix (``spec.gate_up``)."""
        return self._pick_quant_method(
            spec.gate_up, spec.method, lambda m: m.can_implement_experts(spec), spec
        )

    def _pick_quant_method(
        self,
        offered_for: LayerQuantSpec,
        name: str,
        can_implement: Callable[[QuantMethod], tuple[bool, str]],
        described: object,
    ) -> QuantMethod:
        candidates = [
            method
            for methods in self._manager.hook.kvplane_quant_methods(spec=offered_for)
            for method in methods
            if method.name == name
        ]
        reasons: list[str] = []
        for method in sorted(candidates, key=lambda m: m.priority, reverse=True):
            ok, reason = can_implement(method)
            if ok:
                self._note_reference_quant_method(method)
                return method
            reasons.append(f"{method.name}: {reason}")
        if not candidates:
            known = sorted(self.quant_method_names(offered_for))
            raise ValueError(
                f"quantization method {name!r} is not offered by platform "
                f"{self.name!r}; available: {known}"
            )
        raise ValueError(f"no {name!r} method can implement {described}: {reasons}")

    def _note_reference_quant_method(self, method: QuantMethod) -> None:
        """Log once per method name that the platform runs it through the reference."""
        if method.is_reference_fallback and method.name not in self._noted_quant_fallbacks:
            self._noted_quant_fallbacks.add(method.name)
            logger.info(
                "platform %r has no %r quantization of its own; using the torch reference",
                self.name,
                method.name,
            )

    def quant_method_names(self, spec: LayerQuantSpec) -> set[str]:
        return {
            method.name
            for methods in self._manager.hook.kvplane_quant_methods(spec=spec)
            for method in methods
        }

    def communicator(self, group: GroupInfo) -> Communicator:
        return self._manager.hook.kvplane_communicator(group=group)

    # -- KV cache ------------------------------------------------------------------------

    def profile_memory(self, request: MemoryProfileRequest) -> MemoryProfile:
        return self._manager.hook.kvplane_profile_memory(request=request)

    def allocate_kv_cache(self, spec: KVCacheSpec) -> torch.Tensor:
        return self._manager.hook.kvplane_allocate_kv_cache(spec=spec)

    def copy_blocks(self, request: BlockCopyRequest) -> None:
        self._manager.hook.kvplane_copy_blocks(request=request)

    # -- execution -----------------------------------------------------------------------

    def graph_runner(self, request: GraphCaptureRequest) -> GraphRunner | None:
        return self._manager.hook.kvplane_graph_runner(request=request)

    # -- internals -----------------------------------------------------------------------

    def _implements(self, hook_name: str) -> bool:
        caller = getattr(self._manager.hook, hook_name)
        return any(impl.plugin_name == self.name for impl in caller.get_hookimpls())

    def _log_reference_fallbacks(self) -> None:
        """One line naming the hooks the platform leaves to the core's reference (hooks
        the reference does not have, like emulation, are simply not offered)."""
        fallbacks = [
            hook_name
            for hook_name in sorted(set(dir(self._manager.hook)) - set(REQUIRED_HOOKS))
            if hook_name.startswith("kvplane_")
            and hasattr(reference, hook_name)
            and not self._implements(hook_name)
        ]
        if fallbacks:
            logger.info(
                "platform %r uses the torch reference for %s", self.name, ", ".join(fallbacks)
            )

    def _resolve_ops(self) -> Ops:
        query = OpsQuery(device_type=self.info.device_type)
        table: dict[str, Any] = {}
        platform_names: set[str] = set()
        # Hook implementations run platform first, reference last (trylast): first wins.
        for impl in reversed(self._manager.hook.kvplane_ops.get_hookimpls()):
            # Pass only the arguments the implementation declares, as pluggy itself does.
            arguments = {"query": query}
            # pluggy types a raw implementation's result as object; the spec says a mapping.
            result = cast(
                Mapping[str, Callable[..., object]],
                impl.function(*(arguments[name] for name in impl.argnames)) or {},
            )
            unknown = set(result) - set(OP_NAMES)
            if unknown:
                raise ValueError(f"plugin {impl.plugin_name!r} offers unknown ops {unknown}")
            for op_name, op in result.items():
                table.setdefault(op_name, op)
                if impl.plugin_name != reference.REFERENCE_PLUGIN_NAME:
                    platform_names.add(op_name)
        reference_ops = [op_name for op_name in OP_NAMES if op_name not in platform_names]
        if reference_ops:
            logger.info(
                "platform %r uses the reference ops %s", self.name, ", ".join(reference_ops)
            )
        return Ops(**{op_name: table[op_name] for op_name in OP_NAMES})
