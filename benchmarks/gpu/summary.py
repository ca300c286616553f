"""The compact table printed at the end of the suite (also stored as ``summary`` lines)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def summary_lines(results: dict[str, Any]) -> list[str]:
    lines = [f"{'section':<10}{'status':<9}{'seconds':>8}  figures", "-" * 100]
    for name, entry in results.get("sections", {}).items():
        try:
            figures = _FIGURES[name](entry["result"]) if entry.get("status") == "ok" else ""
        except Exception as error:  # a summary bug must not hide the results
            figures = f"(summary failed: {type(error).__name__}: {error})"
        if entry.get("status") == "error" and "error" in entry:
            figures = entry["error"].strip().splitlines()[-1][:120]
        if entry.get("status") == "skipped":
            figures = entry.get("reason", "")
        status = entry.get("status", "?")
        for index, text in enumerate(figures.split("\n") if figures else [""]):
            head = (
                f"{name:<10}{status:<9}{entry.get('seconds', 0.0):>8.1f}"
                if index == 0
                else " " * 27
            )
            lines.append(f"{head}  {text}")
    if "fatal_error" in results:
        lines.append("FATAL: " + results["fatal_error"].strip().splitlines()[-1])
    return lines


def _env(result: dict[str, Any]) -> str:
    rates, device = result["memory_rates"], result["device"]
    return (
        f"{device.get('name', device['type'])}: copy {rates['copy_read_write_GBps']:,.0f} GB/s "
        f"(read+write; one-way {rates['copy_one_way_GBps']:,.0f}), read-only "
        f"{rates['read_only_GBps']:,.0f} GB/s, {rates['matmul_dtype']} matmul "
        f"{rates['matmul_TFLOPs']:,.1f} TFLOP/s"
    )


def _tests(result: dict[str, Any]) -> str:
    if "skipped" in result:
        return result["skipped"]
    parts = []
    for name, run in result.items():
        counts = run.get("counts") or {}
        state = "TIMEOUT " if run.get("timed_out") else ""
        parts.append(
            f"{name}: {state}{counts.get('passed', '?')} passed, {counts.get('failed', '?')} "
            f"failed, {counts.get('errors', '?')} errors, {counts.get('skipped', '?')} skipped"
        )
    return "\n".join(parts)


def _e2e(result: dict[str, Any]) -> str:
    parts = []
    for key, case in result["cases"].items():
        if "error" in case:
            parts.append(f"{key}: ERROR {case['error'].strip().splitlines()[-1][:80]}")
            continue
        s = case["summary"]
        parts.append(
            f"{key}: {'PASS' if case['passed'] else 'FAIL'}; identical prompts "
            f"{s['identical_prompts']}, equal {s['equal_positions']}/{s['total_positions']}, "
            f"forced top-5 {s['forced_in_top5_positions']}, forced argmax "
            f"{s['forced_argmax_positions']}"
        )
    return "\n".join(parts)


def _throughput(result: dict[str, Any]) -> str:
    k = result["kvplane"]
    text = (
        f"{k['requests_per_second']:.2f} req/s, {k['tokens_per_second']:,.0f} total tok/s, "
        f"{k['output_tokens_per_second']:,.0f} out tok/s"
    )
    roofline = result.get("roofline") or {}
    limit = roofline.get("ceiling_output_tokens_per_s")
    if limit:
        text += f"; ceiling {limit:,.0f} out tok/s, fraction {result['fraction_of_ceiling']:.2f}"
    return text


def _c(result: dict[str, Any]) -> str:
    return f"{result['model']} x{result['num_requests']}: {_throughput(result)}"


def _a(result: dict[str, Any]) -> str:
    return "\n".join(
        f"{model}: {_throughput(r)}" if "kvplane" in r else f"{model}: {r.get('status', '?')}"
        for model, r in result.items()
    )


def _latency(result: dict[str, Any]) -> str:
    parts = []
    for model, r in result.items():
        runs = [v for k, v in r.items() if k.startswith("bs")]
        parts.append(
            f"{model}: "
            + ", ".join(
                f"bs{x['batch_size']} {x['avg_latency']:.3f} s ({x['avg_per_token_ms']:.2f} ms/tok)"
                for x in runs
            )
            if runs
            else f"{model}: {r.get('status', '?')}"
        )
    return "\n".join(parts)


def _attention(result: dict[str, Any]) -> str:
    parts = []
    for name, backend in result["backends"].items():
        if "error" in backend:
            parts.append(f"{name}: ERROR {backend['error'].strip().splitlines()[-1][:90]}")
            continue
        cells = []
        for row in backend["rows"]:
            mode = "graph" if "graph_GBps" in row else "eager"
            if f"{mode}_GBps" not in row:
                cells.append(f"b{row['batch']}/{row['context']} error")
                continue
            cells.append(
                f"b{row['batch']}/{row['context']} {row[f'{mode}_GBps']:,.0f} GB/s "
                f"({row[f'{mode}_fraction_of_copy_read_write']:.2f})"
            )
        parts.append(f"{name} (GB/s read, fraction of copy r+w): " + "; ".join(cells))
    return "\n".join(parts)


def _vllm(result: dict[str, Any]) -> str:
    parts = []
    for run, r in result["runs"].items():
        if "error" in r or r.get("returncode"):
            parts.append(f"{run}: failed ({r.get('error') or r.get('log')})")
            continue
        v = r["result"]
        figure = (
            f"{v['out_tok_s']:,.0f} out tok/s"
            if "out_tok_s" in v
            else f"{v['avg_latency']:.3f} s"
            if "avg_latency" in v
            else f"{v.get('output_tokens_per_second', 0):,.0f} out tok/s"
        )
        parts.append(f"{run}: vLLM {figure}; kvplane/vLLM {r.get('comparison')}")
    return "\n".join(parts)


def _serve(result: dict[str, Any]) -> str:
    lines = []
    for key, figures in result["medians"].items():
        shown = ", ".join(f"{name} {value:,.3g}" for name, value in figures.items())
        lines.append(f"{key}: {shown}")
    return "\n".join(lines)


_FIGURES: dict[str, Callable[[dict[str, Any]], str]] = {
    "serve": _serve,
    "env": _env,
    "tests": _tests,
    "e2e": _e2e,
    "C": _c,
    "A": _a,
    "latency": _latency,
    "attention": _attention,
    "vllm": _vllm,
}
