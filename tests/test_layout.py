"""The package's shape: library modules never import the command line, and imports never form a cycle.

Read statically from the source (every import, including those inside functions), so a lazy import
that only hides a cycle from Python still counts.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "mesh_transformer"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE
CLI = f"{PACKAGE}.cli"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def _is_main_guard(node: ast.AST) -> bool:
    """``if __name__ == "__main__":`` — the code a module runs as a command, not as a library."""
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__")


def _imports_outside_main_guard(tree: ast.AST):
    for node in ast.iter_child_nodes(tree):
        if _is_main_guard(node):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from _imports_outside_main_guard(node)


def _resolve(module: str, node: ast.Import | ast.ImportFrom) -> set[str]:
    """The package modules an import statement loads (a ``from package import submodule`` loads both)."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in MODULES}
    base = node.module or ""
    if node.level:
        anchor = module.split(".")[: len(module.split(".")) - node.level + (module in _packages())]
        base = ".".join(anchor + ([base] if base else []))
    found = {base} if base in MODULES else set()
    found |= {f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES}
    return found


def _packages() -> set[str]:
    return {name for name, path in MODULES.items() if path.name == "__init__.py"}


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        graph[name] = set().union(*(_resolve(name, node) for node in _imports_outside_main_guard(tree))) - {name}
    return graph


def _is_command_module(name: str) -> bool:
    return name == CLI or name.startswith(CLI + ".") or name.endswith(".__main__")


def test_the_graph_sees_the_package():
    graph = import_graph()
    assert f"{PACKAGE}.training.run" in graph[f"{PACKAGE}.cli.train"]
    assert f"{PACKAGE}.storage" in graph[f"{PACKAGE}.training.checkpoint"]


def test_no_library_module_imports_the_command_line():
    offenders = sorted(f"{name} imports {', '.join(sorted(d for d in deps if _is_command_module(d)))}"
                       for name, deps in import_graph().items()
                       if not _is_command_module(name) and any(_is_command_module(d) for d in deps))
    assert not offenders, offenders


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def _without_package_inits(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Importing ``a.b`` runs ``a/__init__``; an ``__init__`` that re-exports its submodules is not a cycle."""
    return {name: {d for d in deps if not (d in _packages() and name.startswith(d + "."))}
            for name, deps in graph.items()}


def test_no_import_cycles():
    cycle = _find_cycle(_without_package_inits(import_graph()))
    assert cycle is None, " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_tests_mirror_the_packages():
    """Each subpackage has its tests in the folder of the same name under tests/."""
    tests = Path(__file__).resolve().parent
    packages = {path.parent.name for path in ROOT.glob("*/__init__.py")}
    missing = sorted(name for name in packages if not any((tests / name).glob("test_*.py")))
    assert not missing, f"no tests/<package>/test_*.py for: {missing}"
