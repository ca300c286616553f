"""Result tables and JSON files shared by the bench commands."""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile ``q`` in [0, 100]; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(name: str, values_ms: Sequence[float], unit: str = "ms") -> dict[str, float]:
    """``mean_/median_/p99_`` + name + unit, vLLM's naming."""
    return {
        f"mean_{name}_{unit}": statistics.fmean(values_ms) if values_ms else 0.0,
        f"median_{name}_{unit}": statistics.median(values_ms) if values_ms else 0.0,
        f"p99_{name}_{unit}": percentile(values_ms, 99),
    }


def print_table(title: str, rows: Mapping[str, Any]) -> None:
    width = max(len(key) for key in rows) + 2
    print(f"{'=' * 12} {title} {'=' * 12}")
    for key, value in rows.items():
        shown = f"{value:,.2f}" if isinstance(value, float) else str(value)
        print(f"{key:<{width}}{shown:>16}")


def write_json(path: str | None, result: Mapping[str, Any]) -> None:
    if path:
        Path(path).write_text(json.dumps(result, indent=2) + "\n")
