"""keras_minsnr's modules import each other without circles.

The graph counts every import statement of a module, lazy ones inside functions too (a
lazy import hides a circle, it does not remove it), and the package ``keras_minsnr``
itself imports every module its ``_EXPORTS`` names. Importing ``a.b.c`` also runs
``a.b``'s ``__init__``, except from inside ``a.b`` (the package is already loading then)
unless the module names ``a.b`` itself (``import keras_minsnr as kms``).
"""

import ast
import os

import pytest

import keras_minsnr

PACKAGE = "keras_minsnr"
ROOT = os.path.dirname(keras_minsnr.__file__)


def _modules():
    """``{module name: source path}`` of every module in the package."""
    found = {}
    for folder, _, files in os.walk(ROOT):
        for file in files:
            if not file.endswith(".py"):
                continue
            parts = os.path.relpath(os.path.join(folder, file), ROOT)[:-3].split(os.sep)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([PACKAGE] + parts)] = os.path.join(folder, file)
    return found


def _exports(path):
    """The modules a package's ``_EXPORTS`` table names (imported on first use)."""
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Assign) and any(
            getattr(t, "id", None) == "_EXPORTS" for t in node.targets
        ):
            return {value.elts[0].value for value in node.value.values}
    return set()


def _ancestors(name):
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def import_graph():
    """``{module: set of modules it imports}`` inside the package."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        is_package = path.endswith("__init__.py")
        package = name if is_package else name.rsplit(".", 1)[0]
        targets = set()
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    child = f"{base}.{alias.name}"
                    targets.add(child if child in modules else base)
        if is_package:
            targets |= _exports(path)
        edges = set()
        for target in targets:
            if target not in modules:
                continue
            if target in _ancestors(name):  # the enclosing package itself, by name
                edges.add(target)
            # Importing a.b.c runs a.b first, unless we are inside a.b already.
            for ancestor in _ancestors(target) | {target}:
                if ancestor in modules and ancestor not in _ancestors(name) | {name}:
                    edges.add(ancestor)
        graph[name] = edges
    return graph


def find_cycle(graph):
    """One import circle as a list of modules (first repeated at the end), or None."""
    state = {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, stack)
                if found:
                    return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node, [])
            if found:
                return found
    return None


def test_the_cycle_finder_finds_a_planted_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_sees_lazy_and_package_imports():
    graph = import_graph()
    assert "keras_minsnr.training" in graph["keras_minsnr.cli"] or any(
        "keras_minsnr.training" in graph[m] for m in graph
    )
    # The package imports what `_EXPORTS` names.
    assert "keras_minsnr.diffusion_model" in graph[PACKAGE]


def test_keras_minsnr_has_no_import_circle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


@pytest.mark.parametrize("module", ["keras_minsnr.official"])
def test_library_modules_do_not_import_the_package_itself(module):
    assert PACKAGE not in import_graph()[module]
