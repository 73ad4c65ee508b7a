"""The package's import structure: no import cycles among metanet's modules, and a light top level.

The cycle check reads every module's ``import`` / ``from ... import`` statements with ``ast`` (no
module is imported), at module level *and* inside functions and methods, and builds the graph of
metanet-internal imports. Function-level imports count: an import moved into a function to dodge
a cycle still makes the two modules depend on each other (the "hidden" cycles this test exists
to catch); the fix is to move the shared piece into a module both can import. Imports under
``if TYPE_CHECKING:`` are skipped, since they never run.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Edges (importer, imported) left out of the cycle check. Each one needs its reason here.
ALLOWED_EDGES: dict[tuple[str, str], str] = {}


def module_files(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file under ``package_dir``."""
    base = package_dir.parent
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(base).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return "TYPE_CHECKING" in ast.unparse(test)


def _imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement of a module (any depth), except those under ``TYPE_CHECKING``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                stack.extend(child.orelse)  # the else branch does run
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child
            stack.append(child)


def import_graph(package_dir: Path) -> dict[str, dict[str, int]]:
    """``{module: {imported module: first line}}`` over the package's own modules."""
    files = module_files(package_dir)
    top = package_dir.name

    def owner(name: str) -> str | None:  # the module a dotted name lives in
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, dict[str, int]] = {}
    for module, path in files.items():
        edges = graph.setdefault(module, {})
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in _imports(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                # ``from pkg import sub`` imports the submodule; ``from mod import name`` the module
                targets = [f"{base}.{a.name}" for a in node.names]
            for target in targets:
                if target.split(".")[0] != top:
                    continue
                dep = owner(target)
                if dep is not None and dep != module:
                    edges.setdefault(dep, node.lineno)
    return graph


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle ``[a, b, ..., a]`` per strongly connected component with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan's algorithm (the graph has ~100 nodes)
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(comp)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    cycles = []
    for comp in components:
        members, start = set(comp), min(comp)
        # shortest path from start back to itself inside the component (breadth first)
        paths = {w: [start, w] for w in graph[start] if w in members}
        frontier = list(paths)
        while start not in paths:
            nxt = []
            for v in frontier:
                for w in graph[v]:
                    if w in members and w not in paths:
                        paths[w] = paths[v] + [w]
                        nxt.append(w)
            frontier = nxt
        cycles.append(paths[start])
    return cycles


def _describe(cycle: list[str], graph: dict[str, dict[str, int]]) -> str:
    hops = [f"{a} (line {graph[a][b]}) -> {b}" for a, b in zip(cycle, cycle[1:])]
    return "\n    " + "\n    ".join(hops)


def _checked_graph() -> dict[str, dict[str, int]]:
    graph = import_graph(ROOT / "metanet")
    for a, b in ALLOWED_EDGES:
        graph.get(a, {}).pop(b, None)
    return graph


def test_metanet_has_no_import_cycles() -> None:
    graph = _checked_graph()
    assert len(graph) > 50  # the walk found the package
    cycles = find_cycles(graph)
    found = "".join(_describe(c, graph) for c in cycles)
    assert not cycles, f"import cycles among metanet's modules (top level or in functions):{found}"


def test_allowed_edges_still_exist() -> None:
    graph = import_graph(ROOT / "metanet")
    stale = [edge for edge in ALLOWED_EDGES if edge[1] not in graph.get(edge[0], {})]
    assert not stale, f"remove these from ALLOWED_EDGES, the imports are gone: {stale}"


def test_the_checker_finds_a_cycle_hidden_in_a_function(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from .. import c\n    return c\n")
    (pkg / "c.py").write_text("import pkg.a\n")
    (pkg / "d.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n"
    )
    (pkg / "e.py").write_text("import os\nfrom pkg.a import thing\n")
    graph = import_graph(pkg)
    assert graph["pkg.d"] == {} and graph["pkg.e"] == {"pkg.a": 2}
    (cycle,) = find_cycles(graph)
    assert cycle == ["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]
    assert "pkg.sub.b (line 2) -> pkg.c" in _describe(cycle, graph)
    (pkg / "c.py").write_text("import os\n")
    assert find_cycles(import_graph(pkg)) == []


@pytest.mark.parametrize(
    "module, heavy",
    [
        ("metanet", ("torch", "torch_geometric", "lightning", "h5py", "matplotlib")),
        ("metanet.metrics", ("torch_geometric", "lightning", "matplotlib")),
        ("metanet.data.readers", ("torch_geometric", "lightning", "h5py")),
    ],
)
def test_imports_stay_light(module: str, heavy: tuple[str, ...]) -> None:
    code = f"import sys, {module}\nprint(','.join(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    ).stdout.strip()
    assert out == "", f"import {module} loads {out} eagerly"
