"""The import graph of falcon_h1/: no cycle between its files, none between its subpackages, and
`recipes` imported only by the command-line entry points.

The graph is read with `ast` from every import statement of every file, those inside functions
included: an import deferred into a function still ties the two modules together, it only hides
the cycle until that function runs. An edge goes from a module to the module it names
(`from falcon_h1.training import checkpoint_io` names falcon_h1.training.checkpoint_io); the
package __init__ that Python runs on the way is not an edge, or every package would be a cycle
with its own modules. At the subpackage level, falcon_h1.X.* is node X and a top-level module
falcon_h1/X.py is node X too.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "falcon_h1"
# The `falcon-h1` command and the training entry point: they register and run recipes.
RECIPES_IMPORTED_BY = {"falcon_h1.cli", "falcon_h1.train"}


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imported_names(module: str, path: Path) -> list[tuple[str, int]]:
    """(dotted name, line) of everything `module` imports, relative imports resolved."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), package) if node.level \
                else node.module
            # `from X import name`: the submodule X.name where there is one, else X.
            names += [(f"{base}.{alias.name}", node.lineno) for alias in node.names]
    return names


def _owner(name: str, modules: dict[str, Path]) -> str | None:
    """The falcon_h1 module a dotted name lies in, or None for a name outside falcon_h1."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported falcon_h1 module: line of the first import of it}."""
    modules = _modules()
    graph = {}
    for module, path in modules.items():
        edges = graph.setdefault(module, {})
        for name, line in _imported_names(module, path):
            target = _owner(name, modules)
            if target is not None and target != module:
                edges.setdefault(target, line)
    return graph


def subpackage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def subpackage_graph(graph: dict[str, dict[str, int]]) -> dict[str, dict[str, tuple[str, str]]]:
    """subpackage -> {imported subpackage: (one importing module, the module it imports)}."""
    result = {}
    for module, edges in sorted(graph.items()):
        result.setdefault(subpackage(module), {})
        for target in sorted(edges):
            if subpackage(target) != subpackage(module):
                result[subpackage(module)].setdefault(subpackage(target), (module, target))
    return result


def cycles(graph: dict[str, dict]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def test_cycles_are_found():
    graph = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1, "d": 1}, "d": {}, "e": {"d": 1}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b": 1}, "b": {}}) == []


def test_imports_inside_functions_and_relative_imports_are_read(tmp_path):
    path = tmp_path / "mixer.py"
    path.write_text("import torch\nfrom . import layout\n\n\ndef f():\n    from ..inference.cache import Cache\n")
    assert _imported_names("falcon_h1.model.mixer", path) == [
        ("torch", 1), ("falcon_h1.model.layout", 2), ("falcon_h1.inference.cache.Cache", 6)]


def test_no_cycle_between_files():
    graph = import_graph()
    problems = []
    for component in cycles(graph):
        members = set(component)
        problems.append(" <-> ".join(component) + ": " + "; ".join(
            f"{module} -> {target} (line {line})" for module in component
            for target, line in sorted(graph[module].items()) if target in members))
    assert not problems, "import cycles between files:\n" + "\n".join(problems)


def test_no_cycle_between_subpackages():
    packages = subpackage_graph(import_graph())
    problems = []
    for component in cycles(packages):
        members = set(component)
        problems.append(" <-> ".join(component) + ": " + "; ".join(
            f"{module} -> {target}" for package in component
            for imported, (module, target) in sorted(packages[package].items()) if imported in members))
    assert not problems, "import cycles between subpackages:\n" + "\n".join(problems)


def test_only_the_entry_points_import_recipes():
    importers = sorted(module for module, path in _modules().items() if module not in RECIPES_IMPORTED_BY
                       and any(name.split(".")[0] == "recipes" for name, _ in _imported_names(module, path)))
    assert not importers, f"{importers} import recipes; only {sorted(RECIPES_IMPORTED_BY)} may"
