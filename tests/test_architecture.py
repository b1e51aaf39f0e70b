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


def import_edges(root: Path, package: str) -> dict[str, set[str]]:
    """Every module's imports of the package's modules, read from the source (imports inside
    functions included).  ``from pkg import name`` imports ``pkg`` itself (its ``__init__`` runs
    and must be complete), and ``pkg.name`` too when that is a module; ``import pkg.mod`` and
    ``from pkg.mod import name`` import ``pkg.mod``."""
    modules = {}
    for file in root.rglob("*.py"):
        parts = list(file.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = file
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for name, file in modules.items():
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module in modules:
                    edges[name].add(node.module)
                edges[name].update(
                    f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules
                )
            elif isinstance(node, ast.Import):
                edges[name].update(a.name for a in node.names if a.name in modules)
    for name in edges:
        edges[name].discard(name)
    return edges


def _edge_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Modules that reach themselves (each cycle reported by its sorted members)."""
    found = set()
    for start in edges:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in edges[node]:
                if nxt == start:
                    found.add(tuple(sorted(path)))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
    return sorted(list(c) for c in found)


def test_no_import_cycle_through_a_package_init() -> None:
    assert _edge_cycles(import_edges(PACKAGE, "dengine_cli")) == []


def test_the_package_cycle_finder_finds_one(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from pkg.sub.a import f\n")
    (pkg / "sub" / "a.py").write_text("def f():\n    from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("")
    assert _edge_cycles(import_edges(pkg, "pkg")) == [["pkg.sub", "pkg.sub.a"]]


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


#: What starts threads or processes: only the execution layer (``dengine_cli.parallel``) may.
CONCURRENCY_NAMES = {"ThreadPoolExecutor", "ProcessPoolExecutor", "Thread", "fork", "Process", "Pool"}
CONCURRENCY_MODULES = ("multiprocessing",)


def workers_started_outside(root: Path, layer: str = "parallel") -> list[str]:
    """Places outside ``root/layer`` that start threads or processes themselves: a use of
    ``os.fork``, ``threading.Thread``, an executor or :mod:`multiprocessing`."""
    found = []
    for file in sorted(root.rglob("*.py")):
        if file.relative_to(root).parts[0] == layer:
            continue
        for node in ast.walk(ast.parse(file.read_text())):
            if _starts_workers(node):
                found.append(f"{file.relative_to(root)}:{getattr(node, 'lineno', 0)}")
    return found


def _starts_workers(node: ast.AST) -> bool:
    if isinstance(node, ast.Import):
        return any(a.name.split(".")[0] in CONCURRENCY_MODULES for a in node.names)
    if isinstance(node, ast.ImportFrom):
        module = (node.module or "").split(".")[0]
        return module in CONCURRENCY_MODULES or bool({a.name for a in node.names} & CONCURRENCY_NAMES)
    return (
        isinstance(node, ast.Attribute)
        and node.attr in CONCURRENCY_NAMES
        and isinstance(node.value, ast.Name)
        and node.value.id in ("os", "threading", "futures")
    )


def test_only_the_execution_layer_starts_threads_or_processes() -> None:
    assert workers_started_outside(PACKAGE) == []


def test_the_concurrency_check_sees_a_thread_and_a_pool(tmp_path: Path) -> None:
    (tmp_path / "store").mkdir()
    (tmp_path / "parallel").mkdir()
    (tmp_path / "store" / "a.py").write_text(
        "import threading\nfrom concurrent.futures import ThreadPoolExecutor\nt = threading.Thread()\n"
    )
    (tmp_path / "parallel" / "b.py").write_text("import os\nos.fork()\n")
    assert workers_started_outside(tmp_path) == ["store/a.py:2", "store/a.py:3"]
