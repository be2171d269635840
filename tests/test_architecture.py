"""The package's import graph, read from the source (every import statement, those inside
functions included): dependencies run one way.

- no import cycle anywhere;
- the engine imports the method contract (distill.method), never the methods (distill.distillers
  or the catalog that imports them); a method imports no engine module;
- the contract imports neither the engine nor the methods;
- a function-level import is there only to keep a light tool from importing torch, and says so.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "distill"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def imports_of(name: str) -> list[tuple[str, int, bool]]:
    """(imported distill module, line, inside a function) for every import in module `name`."""
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    package = name if is_package(name) else name.rpartition(".")[0]
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            targets = []
            if isinstance(child, ast.Import):
                targets = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    base = ".".join(package.split(".")[:len(package.split(".")) - child.level + 1]
                                    + ([base] if base else []))
                # `from distill.x import y`: module distill.x.y when there is one, else distill.x
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                           for alias in child.names]
            for target in targets:
                while target and target not in MODULES:   # `import distill.x.y` names a module
                    target = target.rpartition(".")[0]
                if target and target != name:
                    found.append((target, child.lineno, in_function))
            visit(child, inner)

    visit(tree, False)
    return found


GRAPH = {name: imports_of(name) for name in MODULES}


def edges(name: str) -> set[str]:
    """What importing `name` runs: each imported module and the packages above it (their
    __init__ runs first), but not the packages above `name` itself (already running)."""
    running = {name.rsplit(".", k)[0] for k in range(name.count(".") + 1)}
    targets = set()
    for target, _, _ in GRAPH[name]:
        parts = target.split(".")
        targets |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} - running
    return targets & set(MODULES)


def cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges(v):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in MODULES:
        if v not in index:
            strong(v)
    return found


def test_the_package_has_no_import_cycle():
    assert cycles() == []


def test_the_graph_reader_finds_a_planted_cycle(monkeypatch):
    """The check can fail: a function-level import back up closes a circle it reports."""
    planted = dict(GRAPH)
    planted["distill.registry"] = [*GRAPH["distill.registry"], ("distill.app", 1, True)]
    monkeypatch.setattr(__import__(__name__), "GRAPH", planted)
    assert any("distill.registry" in c and "distill.app" in c for c in cycles())


def importers(prefix: str, imported: tuple[str, ...]) -> list[str]:
    return [f"{name}:{line} imports {target}" for name in MODULES
            if name == prefix or name.startswith(prefix + ".")
            for target, line, _ in GRAPH[name]
            if any(target == i or target.startswith(i + ".") for i in imported)]


@pytest.mark.parametrize("layer,forbidden", [
    ("distill.engine", ("distill.distillers", "distill.catalog", "distill.app", "distill.plan",
                        "distill.validation", "distill.teachers", "distill.export",
                        "distill.report", "distill.cli")),
    ("distill.distillers", ("distill.engine", "distill.catalog", "distill.app", "distill.plan",
                            "distill.validation", "distill.teachers", "distill.export")),
    ("distill.method", ("distill.engine", "distill.distillers", "distill.catalog",
                        "distill.config", "distill.app")),
    ("distill.config", ("distill.distillers", "distill.method", "distill.engine",
                        "distill.catalog")),
])
def test_dependencies_run_one_way(layer, forbidden):
    assert importers(layer, forbidden) == []


def test_function_level_imports_say_why():
    """Each import inside a function keeps torch (or a heavy package) out of a light tool's
    start, and its line says so; anything else belongs at the top of the module."""
    unexplained = []
    for name, path in MODULES.items():
        lines = path.read_text(encoding="utf-8").splitlines()
        for target, line, in_function in GRAPH[name]:
            if in_function and "#" not in lines[line - 1]:
                unexplained.append(f"{name}:{line} imports {target} inside a function")
    assert unexplained == []
