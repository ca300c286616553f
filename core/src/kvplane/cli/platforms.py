"""``kvplane platforms``: every discovered platform, whether it can run here, and why.

Shows each platform's distribution and version, probe result (available or not, with the
reason), score, load or probe errors, whether it can be emulated on this host and
whether it is emulated now, and which one kvplane would select (``--device``,
``--emulate``, ``KVPLANE_DEVICE`` and ``KVPLANE_EMULATE`` honoured). Exits 0 when a
platform would be selected, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvplane.plugins import PlatformStatus


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``platforms`` on the top-level ``subparsers``."""
    parser = subparsers.add_parser(
        "platforms",
        help="list installed platforms and which one would be selected",
        description=__doc__,
    )
    parser.add_argument("--json", action="store_true", help="print a JSON list instead")
    parser.add_argument(
        "--device",
        default=None,
        metavar="NAME",
        help="show the selection as if this platform were requested "
        "(default: KVPLANE_DEVICE, else the highest available score)",
    )
    parser.add_argument(
        "--emulate",
        default=None,
        metavar="NAME",
        help="probe this platform through its emulation and show the selection as if it "
        "were requested (default: the platforms named in KVPLANE_EMULATE)",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="print full tracebacks of plugin errors"
    )
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from kvplane.plugins import probe_platforms

    if args.emulate and args.device and args.device.split(":")[0] != args.emulate:
        print(
            f"kvplane platforms: --emulate {args.emulate} and --device {args.device} name "
            "different platforms; give one of them",
            file=sys.stderr,
        )
        return 2
    device = args.device or args.emulate
    emulate = (args.emulate,) if args.emulate else ()
    statuses = probe_platforms(device, emulate=emulate)
    infos = platform_infos(statuses)
    if args.json:
        rows = [dict(status.to_json(), info=infos.get(status.name)) for status in statuses]
        print(json.dumps(rows, indent=2))
    else:
        print(format_table(statuses, infos))
        errors = format_errors(statuses, verbose=args.verbose)
        if errors:
            print(errors)
    flag = "--device" if args.device or not args.emulate else "--emulate"
    explanation, ok = explain_selection(statuses, device, flag)
    if not ok:
        print(explanation, file=sys.stderr)
    elif not args.json:
        print(f"\n{explanation}")
    return 0 if ok else 1


def platform_infos(statuses: list[PlatformStatus]) -> dict[str, dict[str, Any]]:
    """``kvplane_platform_info`` of every available platform, as JSON-ready dicts; a
    platform whose info hook fails gets ``{"error": ...}``."""
    from kvplane.plugins import discover_platforms
    from kvplane.plugins.platform import emulation, make_plugin_manager

    modules = {platform.name: platform.module for platform in discover_platforms()}
    infos: dict[str, dict[str, Any]] = {}
    for status in statuses:
        module = modules.get(status.name)
        if not status.available or module is None:
            continue
        try:
            manager = make_plugin_manager(status.name, module)
            if status.emulated:
                answer = emulation(manager)
                plugin = answer.plugin if answer is not None else None
                manager = make_plugin_manager(status.name, module, emulation_plugin=plugin)
            info = manager.hook.kvplane_platform_info()
        except Exception as error:  # shown to the user, like load and probe errors
            infos[status.name] = {"error": f"{type(error).__name__}: {error}"}
            continue
        if info is None:
            infos[status.name] = {"error": "the plugin implements no kvplane_platform_info"}
            continue
        infos[status.name] = {
            "device_type": info.device_type,
            "device_count": info.device_count,
            "supported_dtypes": list(info.supported_dtypes),
            "capabilities": sorted(info.capabilities),
            "distributed_backend": info.distributed_backend,
            "description": info.description,
            "quantization": quant_method_report(manager, info.supported_dtypes),
        }
    return infos


#: The layer every offered quantization method is asked about: a 4096 x 4096 projection
#: of a float checkpoint (quantized at load), and experts of that hidden size.
_PROBE_LAYER_SIZE = 4096
_PROBE_NUM_EXPERTS = 8
_PROBE_EXPERT_INTERMEDIATE_SIZE = 1024


def quant_method_report(manager: Any, supported_dtypes: tuple[str, ...]) -> list[dict[str, Any]]:
    """Every quantization method ``manager``'s platform offers (its own and the core's
    reference fallbacks), with ``can_implement``'s answer for a bfloat16 (else the
    first supported dtype) projection of a float checkpoint and
    ``can_implement_experts``'s for mixture-of-experts experts, highest priority first."""
    import torch

    from kvplane.plugins.types import ExpertQuantSpec, LayerQuantSpec

    dtype_name = "bfloat16" if "bfloat16" in supported_dtypes else supported_dtypes[0]
    dtype = getattr(torch, dtype_name)
    size = _PROBE_LAYER_SIZE
    probe = LayerQuantSpec("none", size, size, dtype)
    methods = [m for offered in manager.hook.kvplane_quant_methods(spec=probe) for m in offered]
    report = []
    for method in sorted(methods, key=lambda m: (m.name, -m.priority)):
        ok, reason = method.can_implement(LayerQuantSpec(method.name, size, size, dtype))
        experts = ExpertQuantSpec(
            method.name, _PROBE_NUM_EXPERTS, size, _PROBE_EXPERT_INTERMEDIATE_SIZE, dtype
        )
        experts_ok, experts_reason = method.can_implement_experts(experts)
        report.append(
            {
                "name": method.name,
                "priority": method.priority,
                "reference_fallback": method.is_reference_fallback,
                "dtype": dtype_name,
                "can_implement": ok,
                "reason": reason,
                "can_implement_experts": experts_ok,
                "experts_reason": experts_reason,
            }
        )
    return report


def format_table(statuses: list[PlatformStatus], infos: dict[str, dict[str, Any]]) -> str:
    """A fixed-width table, one row per platform; ``*`` marks the selected one."""
    if not statuses:
        return "no kvplane platform is installed (entry-point group 'kvplane.platforms')"
    header = ("", "NAME", "DISTRIBUTION", "AVAILABLE", "SCORE", "DEVICES", "EMULATION", "REASON")
    rows = [header]
    for status in statuses:
        rows.append(
            (
                "*" if status.selected else "",
                status.name,
                f"{status.distribution} {status.version}",
                "yes" if status.available else "no",
                str(status.score) if status.available else "-",
                _devices(infos.get(status.name)),
                _emulation(status),
                status.reason or "-",
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(header) - 1)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False))
        + "  "
        + row[-1]
        for row in rows
    ]
    return "\n".join(line.rstrip() for line in lines)


def _devices(info: dict[str, Any] | None) -> str:
    if info is None:
        return "-"
    if "error" in info:
        return "info failed"
    return f"{info['device_type']} x{info['device_count']}"


def _emulation(status: PlatformStatus) -> str:
    if status.emulated:
        return "now"
    return "can" if status.can_emulate else "-"


def format_errors(statuses: list[PlatformStatus], verbose: bool) -> str:
    """Load, probe and info errors below the table (tracebacks with ``verbose``)."""
    failed = [status for status in statuses if status.error]
    if not failed:
        return ""
    lines = ["", "errors:"]
    for status in failed:
        assert status.error is not None
        text = status.error if verbose else status.error.strip().splitlines()[-1]
        lines.append(f"  {status.name}: " + text.strip().replace("\n", "\n    "))
    if not verbose and any("Traceback" in (status.error or "") for status in failed):
        lines.append("  (run with --verbose for full tracebacks)")
    return "\n".join(lines)


def explain_selection(
    statuses: list[PlatformStatus], device: str | None, flag: str = "--device"
) -> tuple[str, bool]:
    """One line saying which platform would be selected and why, and whether one is;
    ``flag`` is the option that named ``device``."""
    from kvplane.plugins.selection import DEVICE_ENV

    requested = device or os.environ.get(DEVICE_ENV) or None
    source = flag if device else f"{DEVICE_ENV}={requested}"
    selected = next((status for status in statuses if status.selected), None)
    if selected is not None:
        why = f"requested by {source}" if requested else "highest score among available"
        if selected.emulated:
            why += f"; {selected.reason}"
        return f"selected: {selected.name} ({why})", True
    if requested:
        name = requested.split(":")[0]
        match = next((status for status in statuses if status.name == name), None)
        if match is None:
            known = ", ".join(status.name for status in statuses) or "none"
            return f"no platform named {name!r} is installed (discovered: {known})", False
        return f"platform {name!r} ({source}) is not available: {match.reason}", False
    return "no kvplane platform is available on this machine", False
