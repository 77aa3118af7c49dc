"""The package's layers, as a test: what may import what (ARCHITECTURE.md draws the same).

The import graph is read with ``ast`` from every module of ``zeal_asgi``, counting imports inside
functions and under ``TYPE_CHECKING`` too: a cycle hidden behind a function-level import is still
a cycle for a reader.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "zeal_asgi"

# Each unit (a subpackage, or a top-level module) and its layer: a unit imports only units of a
# lower layer.  Units of the same layer (cache, messaging, locks) never import each other.
LAYERS: dict[str, int] = {
    "errors": 0,
    "settings": 1,
    "shm": 2,
    "signing": 3,
    "metrics": 3,
    "_redis": 4,
    "store": 5,
    "cache": 6,
    "messaging": 6,
    "ratelimit": 6,
    "locks": 6,
    "app": 7,
    "response_cache": 7,
    "middleware": 8,
    "health": 8,
    "launcher": 8,
    "fastapi": 9,
    "ws": 10,
    "streams": 10,
    "__main__": 11,
    "__init__": 11,
}


@dataclass(frozen=True)
class Import:
    """One import statement's target as seen from the importing module."""

    module: str  # importing module, dotted
    target: str  # imported module, dotted (absolute)
    names: tuple[str, ...]  # names taken from it (empty for ``import x``)
    line: int

    def where(self) -> str:
        return f"{self.module}:{self.line}"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> Iterator[Import]:
    mod = module_name(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(mod, alias.name, (), node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            yield Import(mod, target, tuple(a.name for a in node.names), node.lineno)


def unit_of(module: str) -> str:
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


ALL = [imp for path in sorted(PACKAGE.rglob("*.py")) for imp in imports_of(path)]
INTERNAL = [imp for imp in ALL if imp.target.split(".")[0] == "zeal_asgi"]


def test_every_unit_has_a_layer() -> None:
    units = {unit_of(module_name(p)) for p in PACKAGE.rglob("*.py")}
    assert units <= LAYERS.keys(), f"units without a layer: {sorted(units - LAYERS.keys())}"


def test_layers_import_only_layers_below() -> None:
    wrong = [
        f"{imp.where()} ({unit_of(imp.module)}, layer {LAYERS[unit_of(imp.module)]}) imports "
        f"{imp.target} ({unit_of(imp.target)}, layer {LAYERS[unit_of(imp.target)]})"
        for imp in INTERNAL
        if unit_of(imp.module) != unit_of(imp.target)
        and LAYERS[unit_of(imp.target)] >= LAYERS[unit_of(imp.module)]
    ]
    assert not wrong, "\n".join(wrong)


def test_no_cycles_between_units() -> None:
    graph: dict[str, set[str]] = {}
    for imp in INTERNAL:
        a, b = unit_of(imp.module), unit_of(imp.target)
        if a != b:
            graph.setdefault(a, set()).add(b)
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join([*path, node, nxt]))
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for unit in sorted(graph):
        if unit not in state:
            visit(unit, [])


def _private_part(imp: Import) -> str | None:
    """The ``_private`` module or name an import takes from another unit, if any."""
    below_unit = imp.target.split(".")[2:]  # the unit's own name (e.g. ``_redis``) is allowed
    for part in below_unit:
        if part.startswith("_") and not part.startswith("__"):
            return part
    for name in imp.names:
        if name.startswith("_") and not name.startswith("__"):
            return name
    return None


def test_no_private_names_across_units() -> None:
    wrong = [
        f"{imp.where()} takes {_private_part(imp)!r} from {imp.target}"
        for imp in INTERNAL
        if unit_of(imp.module) != unit_of(imp.target)
        and unit_of(imp.target) not in ("__init__",)
        and _private_part(imp) is not None
    ]
    assert not wrong, "\n".join(wrong)


def test_package_never_imports_tests_bench_or_the_example() -> None:
    wrong = [
        f"{imp.where()} imports {imp.target}"
        for imp in ALL
        if imp.target.split(".")[0] in ("tests", "bench", "example_app")
    ]
    assert not wrong, "\n".join(wrong)


def test_bench_uses_public_names_only() -> None:
    wrong = []
    for path in sorted((ROOT / "bench").rglob("*.py")):
        for imp in imports_of(path):
            if imp.target.split(".")[0] != "zeal_asgi":
                continue
            private = [p for p in imp.target.split(".")[1:] if p.startswith("_")]
            private += [n for n in imp.names if n.startswith("_")]
            if private:
                wrong.append(f"{imp.where()} takes {private} from {imp.target}")
    assert not wrong, "\n".join(wrong)
