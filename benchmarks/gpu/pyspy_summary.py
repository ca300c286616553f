"""Where a py-spy profile's host time goes: inclusive and self samples per function.

Reads py-spy's raw output (``py-spy record -f raw``: one collapsed stack a line, frames
root first, joined by ``;``, then a space and the sample count) and prints the functions
that hold the most samples, inclusive (anywhere on the stack) and self (the leaf), as
shares of the samples kept. Functions are named ``function (file.py)``, line numbers and
folders dropped. ``--within SUBSTRING`` keeps only the stacks with a function containing
it, and then counts the frames below the deepest such one only (e.g. ``--within "launch
(model_runner.py"`` for the host cost of launching a step).

    python3 benchmarks/gpu/pyspy_summary.py engine.raw --within "_forward (" --top 25
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

#: "function (path/to/file.py:123)" -> "function (file.py)": lines split one function.
_LINE_NUMBER = re.compile(r":\d+\)$")


@dataclass
class Summary:
    """Sample counts of one profile, restricted as :func:`summarize` says."""

    num_samples: int = 0
    inclusive: Counter[str] = field(default_factory=Counter)
    self_time: Counter[str] = field(default_factory=Counter)


def function_of(frame: str) -> str:
    """A frame without its line number, its path cut to the file name."""
    frame = _LINE_NUMBER.sub(")", frame.strip())
    name, _, location = frame.partition(" (")
    return f"{name} ({Path(location.rstrip(')')).name})" if location else name


def summarize(lines: Iterable[str], within: str | None = None) -> Summary:
    """Count the samples of each function in py-spy raw ``lines``; with ``within``, only
    stacks through a frame containing it, from below its deepest such frame."""
    summary = Summary()
    for line in lines:
        stack_text, _, count_text = line.rstrip("\n").rpartition(" ")
        if not stack_text or not count_text.isdigit():
            continue
        frames = stack_text.split(";")
        if within is not None:
            marks = [i for i, frame in enumerate(frames) if within in function_of(frame)]
            if not marks:
                continue
            frames = frames[marks[-1] + 1 :]
        count = int(count_text)
        summary.num_samples += count
        if not frames:
            summary.self_time["(the frame itself)"] += count
            continue
        for function in {function_of(frame) for frame in frames}:
            summary.inclusive[function] += count
        summary.self_time[function_of(frames[-1])] += count
    return summary


def report(summary: Summary, top: int) -> str:
    lines = [f"{summary.num_samples} samples"]
    for title, counter in (("inclusive", summary.inclusive), ("self", summary.self_time)):
        lines.append(f"-- {title}")
        for function, count in counter.most_common(top):
            share = count / max(summary.num_samples, 1)
            lines.append(f"{100 * share:6.1f}%  {count:7d}  {function}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("raw", type=Path, help="py-spy record -f raw output")
    parser.add_argument("--within", default=None, help="keep stacks through this frame")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    with args.raw.open() as lines:
        print(report(summarize(lines, args.within), args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
