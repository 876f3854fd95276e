"""The benchmark scripts import each other without a cycle (shared pieces live in benchmarks/_common.py)."""

from __future__ import annotations

import ast

from conftest import REPO

BENCHMARKS = REPO / "benchmarks"


def _benchmark_imports(path) -> set[str]:
    """Names of the other benchmarks/*.py modules that `path` imports, anywhere in the file."""
    local = {p.stem for p in BENCHMARKS.glob("*.py")}
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return (found & local) - {path.stem}


def test_no_import_cycle_among_benchmarks() -> None:
    graph = {p.stem: _benchmark_imports(p) for p in BENCHMARKS.glob("*.py")}
    assert graph["paradigm_throughput"] == {"_common"} and "gpu" not in graph["paradigm_throughput"]
    assert graph["_common"] == set()

    def reaches(start: str, target: str, seen: set[str]) -> bool:
        return any(n == target or (n not in seen and reaches(n, target, seen | {n})) for n in graph[start])

    cycles = sorted(name for name in graph if reaches(name, name, {name}))
    assert not cycles, f"benchmarks import each other in a cycle: {cycles} ({graph})"


def test_model_shapes_are_defined_once() -> None:
    # multigpu.py and gpu.py used to spell out the 135m Llama shape each; now only _common does.
    for path in BENCHMARKS.glob("*.py"):
        if path.stem not in ("_common", "batched_clients"):
            assert "hidden_size=576" not in path.read_text(), path.name
