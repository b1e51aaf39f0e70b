"""The layout holds: no import cycle between any two modules (imports inside functions count),
and functions stay short outside the readers.  The layer contracts themselves are import-linter's
(``lint-imports`` in scripts/test, contracts in pyproject.toml)."""

from __future__ import annotations

import ast
from pathlib import Path

import grimp

PACKAGE = Path(__file__).resolve().parent.parent / "dengine_cli"


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    modules = sorted(graph.modules)
    edges = {m: sorted(graph.find_modules_directly_imported_by(m) & graph.modules) for m in modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in modules:
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            node, i = work.pop()
            if i == 0:
                index[node] = low[node] = counter
                counter += 1
                stack.append(node)
                on_stack.add(node)
            if i < len(edges[node]):
                work.append((node, i + 1))
                nxt = edges[node][i]
                if nxt not in index:
                    work.append((nxt, 0))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            if low[node] == index[node]:
                component = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    component.append(top)
                    if top == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    return found


def test_no_import_cycle_between_modules() -> None:
    graph = grimp.build_graph("dengine_cli")
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle(tmp_path: Path, monkeypatch: object) -> None:
    pkg = tmp_path / "cyclic_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from cyclic_pkg import b\n")
    (pkg / "b.py").write_text("from cyclic_pkg import a\n")
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        graph = grimp.build_graph("cyclic_pkg")
    finally:
        sys.path.remove(str(tmp_path))
    assert _cycles(graph) == [["cyclic_pkg.a", "cyclic_pkg.b"]]


#: Readers parse binary formats step by step in long functions by nature (as drgn's and
#: libkdumpfile's do); everything else keeps to about a screen.
LONG_FUNCTIONS_ALLOWED_IN = ("formats",)
MAX_FUNCTION_LINES = 80


def long_functions(root: Path) -> list[str]:
    found = []
    for file in sorted(root.rglob("*.py")):
        if file.relative_to(root).parts[0] in LONG_FUNCTIONS_ALLOWED_IN:
            continue
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                assert node.end_lineno is not None
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    found.append(f"{file.relative_to(root)}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_function_over_80_lines_outside_the_readers() -> None:
    assert long_functions(PACKAGE) == []


def test_the_length_check_sees_a_long_function(tmp_path: Path) -> None:
    (tmp_path / "engine").mkdir()
    body = "\n".join(f"    x{k} = {k}" for k in range(81))
    (tmp_path / "engine" / "long.py").write_text(f"def long():\n{body}\n")
    assert long_functions(tmp_path) == ["engine/long.py:1 long (82 lines)"]
