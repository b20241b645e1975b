"""The packages import one way, down: cluster -> actors -> protocol -> model (DESIGN.md, Layers).

Read from the source with `ast`, so a stray import fails here rather than in a review."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
# package -> the project packages it may import
ALLOWED = {
    "model": set(),
    "protocol": {"model"},
    "actors": {"protocol", "model"},
    "cluster": {"actors", "protocol", "model", "configs"},
}
PROJECT = {"model", "protocol", "actors", "cluster", "benchmarks", "configs", "tests"}
ENTRY_POINT = {"cluster/cli.py": {"benchmarks"}}  # the command line sits on top of everything


def imported_packages(path: Path) -> set[str]:
    """Top-level project packages a module imports (at any depth of its code)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out & PROJECT


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_point_down(package: str) -> None:
    wrong = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        if "proto" in path.parts:  # generated stubs
            continue
        name = str(path.relative_to(ROOT))
        bad = imported_packages(path) - ALLOWED[package] - {package} - ENTRY_POINT.get(name, set())
        if bad:
            wrong[name] = sorted(bad)
    assert not wrong, f"imports against the layering: {wrong}"


def test_the_cli_imports_only_the_benchmark_options_at_start() -> None:
    tree = ast.parse((ROOT / "cluster/cli.py").read_text())
    top = {n.module for n in tree.body if isinstance(n, ast.ImportFrom) and n.module}
    assert {m for m in top if m.startswith("benchmarks")} == {"benchmarks.args"}
