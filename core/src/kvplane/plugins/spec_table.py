"""The hook table of ``docs/plugins.md``, generated from :mod:`kvplane.plugins.hookspec`.

The hook specs are the one source: ``python -m kvplane.plugins.spec_table docs/plugins.md``
rewrites the table between the two markers below, and a test fails when the committed
page differs from what this module renders.
"""

from __future__ import annotations

import inspect
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from kvplane.plugins import hookspec

BEGIN_MARKER = "<!-- hook-table: generated from kvplane/plugins/hookspec.py; do not edit -->"
END_MARKER = "<!-- hook-table: end -->"

_VERSION = re.compile(r"\.\. versionadded:: (\S+)")
_IMPLEMENTED_BY = "Implemented by:"


@dataclass(frozen=True, slots=True)
class HookDoc:
    """What the table shows of one hook spec, parsed from its docstring."""

    name: str
    signature: str
    summary: str
    when_called: str
    returns: str
    params: dict[str, str]
    first_result: bool
    implemented_by: str
    version_added: str

    @property
    def is_required(self) -> bool:
        """Whether every platform must implement it (not only some, nor none)."""
        return self.implemented_by.startswith("every platform (**required**)")


def hook_specs() -> list[Callable[..., object]]:
    """Every hook spec function, in the order the module declares them."""
    functions = [
        value
        for name, value in vars(hookspec).items()
        if name.startswith("kvplane_") and inspect.isfunction(value)
    ]
    return sorted(functions, key=lambda function: function.__code__.co_firstlineno)


def parse_hook(function: Callable[..., object]) -> HookDoc:
    """Parse one spec's docstring (the template :mod:`kvplane.plugins.hookspec` states)."""
    doc = inspect.cleandoc(function.__doc__ or "")
    paragraphs = [paragraph.strip() for paragraph in doc.split("\n\n")]
    fields = dict(_fields(doc))
    implemented = next((p for p in paragraphs if p.startswith(_IMPLEMENTED_BY)), "")
    version = _VERSION.search(doc)
    marker = getattr(function, f"{hookspec.PROJECT_NAME}_spec", {}) or {}
    parameters = list(inspect.signature(function).parameters)
    return HookDoc(
        name=function.__name__,
        signature=f"{function.__name__}({', '.join(parameters)})",
        summary=paragraphs[0] if paragraphs else "",
        when_called=_first_sentence(paragraphs[1]) if len(paragraphs) > 1 else "",
        returns=fields.get("returns", ""),
        params={key[len("param ") :]: text for key, text in fields.items() if key != "returns"},
        first_result=bool(marker.get("firstresult", False)),
        implemented_by=_one_line(implemented.removeprefix(_IMPLEMENTED_BY)),
        version_added=version.group(1) if version else "",
    )


def render_table() -> str:
    """The markdown table of every hook, between the begin and end markers."""
    lines = [
        BEGIN_MARKER,
        "",
        "| hook | when called | returns | results | implemented by | since |",
        "|---|---|---|---|---|---|",
    ]
    for hook in (parse_hook(function) for function in hook_specs()):
        combine = "first non-None" if hook.first_result else "all, merged"
        cells = (
            f"`{hook.signature}`",
            hook.when_called,
            _first_sentence(hook.returns),
            combine,
            hook.implemented_by,
            hook.version_added,
        )
        lines.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
    lines += ["", END_MARKER]
    return "\n".join(lines)


def replace_table(page: str) -> str:
    """``page`` with the text between the markers replaced by :func:`render_table`."""
    start = page.index(BEGIN_MARKER)
    end = page.index(END_MARKER) + len(END_MARKER)
    return page[:start] + render_table() + page[end:]


def _fields(doc: str) -> Iterator[tuple[str, str]]:
    """``(name, text)`` of each ``:param x:`` / ``:returns:`` field, continuation lines
    joined."""
    for match in re.finditer(r"^:(param \w+|returns):(.*?)(?=^\S|\Z)", doc, re.M | re.S):
        yield match.group(1), _one_line(match.group(2))


def _first_sentence(text: str) -> str:
    text = _one_line(text)
    match = re.search(r"(?<!e\.g)\.(\s|$)", text)
    return text[: match.start() + 1] if match else text


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _cell(text: str) -> str:
    """Markdown of a docstring fragment: ``code`` and Sphinx roles become `code`."""
    text = re.sub(r":\w+:`~?(?:[\w.]+\.)?([\w]+)`", r"`\1`", text)
    return text.replace("``", "`").replace("|", "\\|")


def main(argv: list[str]) -> int:
    """Rewrite the hook table of the markdown page named by ``argv[0]`` in place."""
    if len(argv) != 1:
        print("usage: python -m kvplane.plugins.spec_table PATH/TO/plugins.md", file=sys.stderr)
        return 2
    path = Path(argv[0])
    path.write_text(replace_table(path.read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
