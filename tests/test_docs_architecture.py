"""docs/architecture.md names every module of the core and of each platform package."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGE = (ROOT / "docs" / "architecture.md").read_text()
CORE_SECTION = PAGE[
    PAGE.index("## Packages and modules (core)") : PAGE.index("## Platform packages")
]
PLATFORM_SECTION = PAGE[PAGE.index("## Platform packages") :]
CORE = ROOT / "core" / "src" / "kvplane"
PLATFORM_PACKAGES = [
    *sorted((ROOT / "platforms").glob("*/src/kvplane_*")),
    *sorted((ROOT / "plugins_template" / "src").glob("kvplane_*")),
]


def _expand(pattern: str) -> list[str]:
    """``models/{a,b}.py`` -> ``["models/a.py", "models/b.py"]``."""
    parts = re.split(r"\{([^}]*)\}", pattern)
    choices = [part.split(",") if index % 2 else [part] for index, part in enumerate(parts)]
    return ["".join(combination) for combination in itertools.product(*choices)]


def _listed_core_paths() -> set[str]:
    listed: set[str] = set()
    for row in re.findall(r"^\| `([^`]+)` \|(.*)$", CORE_SECTION, re.M):
        path, text = row
        if path.endswith("/"):  # a package row names its modules in its text
            listed.update(path + name for name in re.findall(r"`(\w+\.py)`", text))
        else:
            listed.update(_expand(path))
    return listed


def _modules(package: Path) -> list[str]:
    return sorted(
        str(path.relative_to(package))
        for path in package.rglob("*.py")
        if path.name != "__init__.py" or path.parent == package == CORE
    )


@pytest.mark.parametrize("module", _modules(CORE))
def test_core_module_is_listed(module: str) -> None:
    assert module in _listed_core_paths(), f"docs/architecture.md does not list {module}"


@pytest.mark.parametrize(
    "package, module",
    [(package, module) for package in PLATFORM_PACKAGES for module in _modules(package)],
    ids=lambda value: value.name if isinstance(value, Path) else value,
)
def test_platform_module_is_listed(package: Path, module: str) -> None:
    name = module.removeprefix("kernels/")
    line = next((line for line in PLATFORM_SECTION.split("\n- ") if package.name in line), "")
    assert f"`{name}`" in " ".join(line.split()), (
        f"docs/architecture.md's {package.name} entry does not list {module}"
    )
