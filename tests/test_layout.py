"""The package's shape: library modules never import the command line, imports never form a cycle,
and the package's parts (top-level modules and subpackages) import only parts of lower layers.

Read statically from the source (every import, including those inside functions), so a lazy import
that only hides a cycle from Python still counts.
"""

from __future__ import annotations

import ast
import re
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
    assert f"{PACKAGE}.storage" in graph[f"{PACKAGE}.checkpoints.store"]


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


# The layers of the package, lowest first (docs/layout.md). A part is a top-level module or a subpackage;
# a part may import parts of lower layers only, never one of its own layer or above. ``cli`` is on top,
# with the ``python -m`` shims that only reach it.
LAYERS = (
    ("errors", "log", "storage", "hardware", "signals"),
    ("tokenizer",),
    ("config",),
    ("sharding",),
    ("models",),
    ("data",),
    ("checkpoints",),
    ("training",),
    ("inference",),
    ("evaluation",),
    ("serving",),
    ("convert",),
    ("plan",),
    ("cluster",),
    ("tpu",),
    ("cli", "hf", "legacy"),
)
LAYER_OF = {part: level for level, parts in enumerate(LAYERS) for part in parts}


def part_of(module: str) -> str:
    """``mesh_transformer.models.layers`` -> ``models``; the package's own ``__init__`` is the part ``""``."""
    return module.split(".")[1] if "." in module else ""


def part_graph() -> dict[str, set[str]]:
    """Which parts each part imports (``__main__`` shims, which run a command, left out)."""
    graph: dict[str, set[str]] = {}
    for name, deps in import_graph().items():
        if name.endswith(".__main__"):
            continue
        graph.setdefault(part_of(name), set()).update(part_of(d) for d in deps if part_of(d) != part_of(name))
    return graph


def test_every_part_has_a_layer():
    unplaced = sorted(part for part in part_graph() if part and part not in LAYER_OF)
    assert not unplaced, f"add these to LAYERS in tests/test_layout.py and to docs/layout.md: {unplaced}"


def test_parts_import_only_lower_layers():
    upward = sorted(f"{part} imports {dep}" for part, deps in part_graph().items() if part in LAYER_OF
                    for dep in deps if dep and dep in LAYER_OF and LAYER_OF[dep] >= LAYER_OF[part])
    assert not upward, upward


def test_the_package_root_imports_nothing_of_the_package():
    assert not part_graph().get("", set()) - {""}


def documented_layers() -> tuple[tuple[str, ...], ...]:
    """The layers as docs/layout.md draws them (top first, in the code block under "## Layers"), lowest first."""
    text = (ROOT.parent / "docs" / "layout.md").read_text()
    block = text.split("## Layers", 1)[1].split("```", 2)[1]
    rows = [re.split(r"\s{2,}", line.strip(), maxsplit=1)[0] for line in block.splitlines() if line.strip()]
    return tuple(tuple(part.strip() for part in row.split(",")) for row in reversed(rows))


def test_the_layer_table_is_the_one_documented():
    assert documented_layers() == LAYERS
