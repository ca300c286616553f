"""Streaming a tool call: the cost of re-parsing the output at every delta.

A server streaming a call re-parses the whole output each time a few characters arrive
(:meth:`ToolParser.extract_tool_calls_streaming`), so a call of ``n`` characters written
``chunk`` at a time costs ``n / chunk`` parses of a growing text. This times that for a
Hermes call whose arguments are about ``--args-chars`` long, two shapes each: a long string
(an edit tool's file content, with escapes and non-ASCII) and many small fields (nested
objects, arrays, numbers).

``--baseline FILE`` times another ``tool_call_formats.py`` (say, a copy from an older
commit; its imports must resolve from its own folder) on the same texts in the same run,
and checks that both stream the same fragments.

    python benchmarks/tool_call_stream_bench.py --args-chars 200 800 2000 --chunk 3
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from kvplane.structured import tool_call_formats

Parse = Callable[[str, bool], object]


def long_string_arguments(num_chars: int) -> dict[str, object]:
    line = 'def f(x):\n    return "São Paulo \\u00e9 ✓"  # tab\there\n'
    content = (line * (num_chars // len(line) + 1))[:num_chars]
    return {"path": "src/app/main.py", "content": content, "overwrite": True}


def many_fields_arguments(num_chars: int) -> dict[str, object]:
    fields: dict[str, object] = {}
    index = 0
    while len(json.dumps(fields)) < num_chars:
        fields[f"field_{index}"] = {
            "city": "Zürich",
            "days": index,
            "ratio": -1.5e-3 * index,
            "tags": ["a", "b"],
            "ok": index % 2 == 0,
        }
        index += 1
    return {"query": "weather", "filters": fields}


SHAPES: dict[str, Callable[[int], dict[str, object]]] = {
    "long string": long_string_arguments,
    "many fields": many_fields_arguments,
}


def hermes_text(arguments: dict[str, object]) -> str:
    call = {"name": "edit_file", "arguments": arguments}
    return f"Let me do that.\n<tool_call>\n{json.dumps(call, ensure_ascii=False)}\n</tool_call>"


def stream(parse: Parse, text: str, chunk: int) -> tuple[float, list[str]]:
    """Seconds to parse every prefix ``chunk`` characters apart; arguments at each step."""
    arguments_seen: list[str] = []
    start = time.perf_counter()
    for end in range(chunk, len(text) + chunk, chunk):
        parsed = parse(text[:end], False)
        calls = parsed.calls  # type: ignore[attr-defined]
        arguments_seen.append(calls[0].arguments if calls else "")
    return time.perf_counter() - start, arguments_seen


def best_of(repeats: int, parse: Parse, text: str, chunk: int) -> tuple[float, list[str]]:
    runs = [stream(parse, text, chunk) for _ in range(repeats)]
    return min(run[0] for run in runs), runs[0][1]


def load_module(path: Path) -> ModuleType:
    sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(f"baseline_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--args-chars", type=int, nargs="+", default=[200, 800, 2000])
    parser.add_argument("--chunk", type=int, default=3, help="characters per delta")
    parser.add_argument("--repeats", type=int, default=5, help="best of this many runs")
    parser.add_argument("--baseline", type=Path, help="another tool_call_formats.py to time")
    args = parser.parse_args()
    baseline = load_module(args.baseline) if args.baseline else None

    header = f"{'shape':<12} {'args':>6} {'deltas':>6} {'current ms':>11} {'us/delta':>9}"
    print(header + (f" {'baseline ms':>12} {'current/baseline':>17}" if baseline else ""))
    for num_chars in args.args_chars:
        for shape, make in SHAPES.items():
            text = hermes_text(make(num_chars))
            seconds, seen = best_of(args.repeats, tool_call_formats.parse_hermes, text, args.chunk)
            num_deltas = len(seen)
            row = f"{shape:<12} {num_chars:>6} {num_deltas:>6} {seconds * 1e3:>11.2f}"
            row += f" {seconds / num_deltas * 1e6:>9.1f}"
            if baseline is not None:
                base_seconds, base_seen = best_of(
                    args.repeats, baseline.parse_hermes, text, args.chunk
                )
                assert base_seen == seen, "the baseline streams different arguments"
                row += f" {base_seconds * 1e3:>12.2f} {seconds / base_seconds:>17.2f}"
            print(row)


if __name__ == "__main__":
    main()
