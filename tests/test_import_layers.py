"""The packages import one way, down: cluster -> actors -> protocol -> model, and within cluster/
its tiers too: cli -> serving -> llm -> backend -> engine (DESIGN.md, Layers).

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


# cluster/'s tiers, bottom up: each may import the ones before it (and cluster.proto), never those after.
TIERS = ["engine", "backend", "llm", "serving", "cli"]


def cluster_tiers(path: Path) -> set[str]:
    """The cluster tiers a module imports (`cluster.engine.core` -> engine, `cluster.llm` -> llm)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        out |= {n.split(".")[1] for n in names if n.startswith("cluster.") and n.count(".") >= 1}
    return out & set(TIERS)


@pytest.mark.parametrize("tier", TIERS)
def test_cluster_tiers_import_down(tier: str) -> None:
    paths = [ROOT / "cluster" / f"{tier}.py"] if (ROOT / "cluster" / f"{tier}.py").is_file() else []
    paths += sorted((ROOT / "cluster" / tier).rglob("*.py")) if (ROOT / "cluster" / tier).is_dir() else []
    assert paths, f"cluster tier {tier} has no modules"
    above = set(TIERS[TIERS.index(tier) + 1 :])
    wrong = {str(p.relative_to(ROOT)): sorted(cluster_tiers(p) & above) for p in paths}
    wrong = {name: tiers for name, tiers in wrong.items() if tiers}
    assert not wrong, f"imports against the tiers: {wrong}"


def test_the_cluster_package_is_only_its_tiers() -> None:
    loose = {p.stem for p in (ROOT / "cluster").glob("*.py")} - {"__init__", "llm", "cli"}
    assert not loose, f"modules outside cluster/'s tiers: {sorted(loose)}"


def test_the_engine_tier_knows_no_ray() -> None:
    uses_ray = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "cluster" / "engine").rglob("*.py"))
                if any(isinstance(n, (ast.Import, ast.ImportFrom)) and "ray" in {
                    *(a.name.split(".")[0] for a in getattr(n, "names", []) if isinstance(n, ast.Import)),
                    *((n.module or "").split(".")[:1] if isinstance(n, ast.ImportFrom) else [])}
                    for n in ast.walk(ast.parse(p.read_text())))]  # fmt: skip
    assert not uses_ray, f"the engine tier imports Ray: {uses_ray}"


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports by absolute name (`from a.b import c` -> a.b)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


# What the engine may know of the model: its shape, tokenizer, sampling settings and the cache's
# and the window's rules; never the forward (layers, kernels, loading, decode graphs), which is a backend's.
ENGINE_MAY_READ = {"model.config", "model.tokenizer", "model.sampling", "model.kv_cache", "model.attention_plan"}


def test_the_engine_tier_runs_no_model_code() -> None:
    wrong = {str(p.relative_to(ROOT)): sorted(m for m in imported_modules(p)
                                              if m.split(".")[0] == "model" and m not in ENGINE_MAY_READ)
             for p in sorted((ROOT / "cluster" / "engine").rglob("*.py"))}  # fmt: skip
    assert not {k: v for k, v in wrong.items() if v}, f"the engine imports the model's runtime: {wrong}"


def test_backends_reach_the_engine_only_through_its_protocol() -> None:
    """No arrow from backend/ back into the engine's internals: a backend knows the engine by
    `cluster.engine.backend` (the protocol, `Executed`, the errors) alone."""
    wrong = {str(p.relative_to(ROOT)): sorted(m for m in imported_modules(p)
                                              if m.startswith("cluster.engine") and m != "cluster.engine.backend")
             for p in sorted((ROOT / "cluster" / "backend").rglob("*.py"))}  # fmt: skip
    assert not {k: v for k, v in wrong.items() if v}, f"backend/ imports the engine's internals: {wrong}"


def test_the_cli_imports_only_the_benchmark_options_at_start() -> None:
    tree = ast.parse((ROOT / "cluster/cli.py").read_text())
    top = {n.module for n in tree.body if isinstance(n, ast.ImportFrom) and n.module}
    assert {m for m in top if m.startswith("benchmarks")} == {"benchmarks.args"}
