"""The package's import graph has no cycle, and each Lua script sits beside the one module that runs it.

The rule (docs/design.md, "Import layering"): module A depends on module B when A's source imports
B anywhere: at module level, under ``if TYPE_CHECKING:``, or inside a function. A type-only import
is still a dependency a reader must follow, and an import moved into a function to dodge a cycle is
still a cycle, so all three count; the graph is read from the source (AST), never by importing.
An import of a package counts as one of its ``__init__``; ``from . import name`` of a submodule
counts as that submodule. A cycle is broken by moving a type or a protocol to a leaf module
(``flask_immutant/protocols.py``, ``flask_immutant/state.py``), not by hiding the import.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "flask_immutant"

Graph = dict[str, set[str]]


def module_names(root: Path) -> dict[str, Path]:
    """Dotted name -> source file, for every module of the package at ``root``."""
    found = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imported(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules ``module`` imports, at any depth of its source (see the rule above)."""
    is_package = path.name == "__init__.py"
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                origin = ".".join([*base, *([node.module] if node.module else [])])
            else:
                origin = node.module or ""
            for alias in node.names:
                submodule = f"{origin}.{alias.name}"
                targets.add(submodule if submodule in known else origin)
    resolved = set()
    for target in targets:
        while target and target not in known:  # a name inside a module: the module
            target = target.rpartition(".")[0]
        if target and target != module:
            resolved.add(target)
    return resolved


def import_graph(root: Path) -> Graph:
    known = module_names(root)
    return {module: imported(module, path, known) for module, path in known.items()}


def cycles(graph: Graph) -> list[list[str]]:
    """One cycle (as a path that returns to its start) per strongly connected component."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for following in sorted(graph[node]):
            if following not in index:
                visit(following)
                low[node] = min(low[node], low[following])
            elif following in stack:
                low[node] = min(low[node], index[following])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_one_cycle(graph, component) for component in components]


def _one_cycle(graph: Graph, component: set[str]) -> list[str]:
    """A shortest path from the component's first module back to itself, inside the component."""
    start = min(component)
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for following in sorted(graph[node] & component):
            if following == start:
                return [*paths[node], start]
            if following not in paths:
                paths[following] = [*paths[node], following]
                queue.append(following)
    raise AssertionError(f"{sorted(component)} is not a cycle")


def test_the_package_has_no_import_cycle() -> None:
    found = cycles(import_graph(PACKAGE))
    assert not found, "import cycles (break each by moving a type or protocol to a leaf module):\n" + "\n".join(
        " -> ".join(cycle) for cycle in found)


def test_type_only_and_function_level_imports_count(tmp_path: Path) -> None:
    # Given a package whose two modules import each other only under TYPE_CHECKING and in a function
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import B\n")
    (package / "b.py").write_text("def f():\n    from . import a\n    return a\n")
    (package / "c.py").write_text("from pkg import b\n")
    # Then the graph has both edges, and the cycle, and no other
    graph = import_graph(package)
    assert graph == {"pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}, "pkg.c": {"pkg.b"}}
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.a"]]


#: A script path as the loader is given it: "folder/module_action", the action maybe an f-string field.
SCRIPT_PATH = re.compile(r'lua\.script\([^)]*?"([a-z]+)/([a-z_]+)_([a-z]+|\{[a-z]+\})"')


def test_each_lua_script_sits_beside_the_one_module_that_runs_it() -> None:
    # Every load names <folder>/<module>_<action> from <folder>/<module>.py itself
    loaded: dict[Path, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        for folder, module, action in SCRIPT_PATH.findall(path.read_text(encoding="utf-8")):
            assert path == PACKAGE / folder / f"{module}.py", f"{path.relative_to(PACKAGE)} runs {folder}/{module}_*"
            loaded.setdefault(path, set()).add(action)
    # And every script is <module>_<action>.lua beside a module that loads it
    scripts = sorted(PACKAGE.rglob("*.lua"))
    assert scripts and loaded
    for script in scripts:
        module, _, action = script.stem.rpartition("_")  # a module's name may hold "_", an action's not
        actions = loaded.get(script.parent / f"{module}.py", set())
        assert action in actions or any(a.startswith("{") for a in actions), \
            f"{script.relative_to(PACKAGE)}: no {module}.py beside it runs it"
