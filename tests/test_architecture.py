"""The package's imports point one way: no module of spingen/ imports, even inside a function, a
module that leads back to it; stages import no other stage; only the CLI imports a user tool; the pure spin core imports neither
deepmd-kit nor the rest of spingen (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "spingen"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module this file imports (at any depth of its code), except under `if TYPE_CHECKING:`."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # a submodule imported by name
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def import_graph() -> dict[str, set[str]]:
    return {name: {m for m in imports_of(path) if m in MODULES and m != name} for name, path in MODULES.items()}


def test_no_import_cycle_anywhere_in_the_package():
    graph = import_graph()
    state: dict[str, str] = {}
    cycles = []

    def walk(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(trail[trail.index(nxt):] + [nxt])
            elif nxt not in state:
                walk(nxt, trail + [nxt])
        state[node] = "done"

    for start in sorted(graph):
        if start not in state:
            walk(start, [start])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_stages_import_no_other_stage_and_the_spin_core_stands_alone():
    graph = import_graph()
    stages = {m for m in graph if m.startswith("spingen.stages.")}
    for stage in stages:
        assert not graph[stage] & (stages - {stage}), f"{stage} imports {sorted(graph[stage] & stages)}"
    for module in (m for m in graph if m.startswith("spingen.spin")):
        outside = {m for m in graph[module] if not m.startswith("spingen.spin")}
        assert not outside, f"{module} imports {sorted(outside)}"
        assert not any(m.split(".")[0] in ("deepmd", "torch", "ase") for m in imports_of(MODULES[module]))
    assert graph["spingen.layout"] == set() and graph["spingen.errors"] == set()


def test_only_the_cli_imports_the_user_tools():
    graph = import_graph()
    tools = {m for m in graph if m.startswith("spingen.tools")}
    importers = {m for m, deps in graph.items() if deps & tools and not m.startswith("spingen.tools")}
    assert importers == {"spingen.cli"}, f"user tools imported by {sorted(importers - {'spingen.cli'})}"
