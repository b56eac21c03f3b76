"""No import cycle between the package's modules (issue 23, item 2).

The graph is built from the source with ``ast``, not by importing: every ``import`` and ``from ... import``
statement counts, wherever it stands (module level, inside a function or a method, in a ``try``), and so does
``importlib.import_module("a.literal.name")``. What does not count: imports under ``if TYPE_CHECKING:``
(never executed) and the implicit import of a module's parent package. ``from pkg import name`` is an edge to
``pkg.name`` where that is a module, else to ``pkg`` (its ``__init__``, where the name lives).
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:   # Python 3.10: pytest itself depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]

# Known cycles still being broken (issue 23), each as the set of modules in it. A cycle found must equal one of
# these exactly: any other cycle, one of these grown or shrunk by a module, or an entry whose cycle is gone
# fails the test. Remove an entry when its cycle is broken; empty means no cycle is allowed.
KNOWN_CYCLES: dict[frozenset[str], str] = {}


Graph = dict[str, dict[str, int]]   # module -> {imported module: line of the first such import}


def package_folders(root: Path = ROOT) -> dict[str, Path]:
    """Top-level package name -> folder, from pyproject.toml's setuptools ``package-dir``."""
    tool = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    return {name: root / folder for name, folder in tool["package-dir"].items()}


def module_files(packages: dict[str, Path]) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package ``__init__``) for every ``.py`` file under the folders."""
    modules = {}
    for package, folder in packages.items():
        for path in sorted(folder.rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            parts = list(path.relative_to(folder).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts.pop()
            modules[".".join([package, *parts])] = (path, is_package)
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST):
    """Import statements and literal ``import_module`` calls anywhere in ``tree``, except under TYPE_CHECKING."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _targets(node: ast.AST, module: str, is_package: bool, modules: dict) -> set[str]:
    """The package modules that one import node imports (names outside the package are dropped)."""
    def owning_module(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    if isinstance(node, ast.Call):
        names = [node.args[0].value]
    elif isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module.split(".") if is_package else module.split(".")[:-1]
            package = package[:len(package) - (node.level - 1)]
            base = ".".join(package + ([node.module] if node.module else []))
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
    return {found for found in map(owning_module, names) if found is not None}


def import_graph(packages: dict[str, Path]) -> Graph:
    """Module -> the package modules it imports, with the line of the first import of each."""
    modules = module_files(packages)
    graph: Graph = {}
    for module, (path, is_package) in modules.items():
        edges: dict[str, int] = {}
        for node in _import_nodes(ast.parse(path.read_text(), str(path))):
            for target in _targets(node, module, is_package, modules):
                if target != module:
                    edges[target] = min(edges.get(target, node.lineno), node.lineno)
        graph[module] = edges
    return graph


def cycles(graph: Graph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted; sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
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
    return sorted(found)


def describe(component: list[str], graph: Graph, packages: dict[str, Path]) -> str:
    """One closed path through the component, each hop with the importing file and line."""
    members = set(component)
    modules = module_files(packages)
    path, seen = [component[0]], {component[0]: 0}
    while True:
        inside = [t for t in sorted(graph[path[-1]]) if t in members]
        # A hop that closes the loop first, else an unvisited module, else any (a loop further on).
        step = component[0] if component[0] in inside else next((t for t in inside if t not in seen), inside[0])
        if step in seen:
            loop = path[seen[step]:] + [step]
            break
        seen[step] = len(path)
        path.append(step)
    hops = [f"{a} -> {b} ({modules[a][0].relative_to(ROOT) if modules[a][0].is_relative_to(ROOT) else modules[a][0]}"
            f":{graph[a][b]})" for a, b in zip(loop, loop[1:])]
    return "cycle of " + ", ".join(component) + ":\n    " + "\n    ".join(hops)


def test_the_package_has_no_import_cycle():
    packages = package_folders()
    graph = import_graph(packages)
    assert len(graph) > 100, f"only {len(graph)} modules found under {packages}: the scan is broken"
    found = cycles(graph)
    unexpected = [c for c in found if frozenset(c) not in KNOWN_CYCLES]
    assert not unexpected, "import cycles between modules:\n" + "\n".join(
        describe(c, graph, packages) for c in unexpected)
    stale = [sorted(known) for known in KNOWN_CYCLES if sorted(known) not in found]
    assert not stale, f"these known cycles are gone: remove them from KNOWN_CYCLES: {stale}"


# -- the scan itself, on a small package written here -----------------------------------------------------------

def _write(root: Path, files: dict[str, str]) -> dict[str, Path]:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return {"toy": root / "toy"}


def test_a_cycle_through_a_function_level_import_is_found_and_named(tmp_path):
    packages = _write(tmp_path, {
        "toy/__init__.py": "",
        "toy/pool.py": "from .scoring import fast\n",
        "toy/scoring/__init__.py": "from .fast import score\n",
        "toy/scoring/fast.py": "def score():\n    from ..pool import Pool  # lazily\n    return Pool\n",
        "toy/leaf.py": "import toy.pool\n",
    })
    graph = import_graph(packages)
    assert graph["toy.pool"] == {"toy.scoring.fast": 1}
    assert graph["toy.scoring.fast"] == {"toy.pool": 2}
    assert cycles(graph) == [["toy.pool", "toy.scoring.fast"]]
    text = describe(["toy.pool", "toy.scoring.fast"], graph, packages)
    assert "toy.pool -> toy.scoring.fast" in text and "toy.scoring.fast -> toy.pool" in text
    assert "fast.py:2" in text


def test_type_checking_imports_and_parent_packages_make_no_cycle(tmp_path):
    packages = _write(tmp_path, {
        "toy/__init__.py": "from .a import A\n",
        "toy/a.py": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import B\n"
                     "else:\n    import json\nA = 1\n"),
        "toy/b.py": "from .a import A\nimport numpy\nimport importlib\nm = importlib.import_module('toy.c')\n",
        "toy/c.py": "",
    })
    graph = import_graph(packages)
    assert graph["toy.a"] == {} and graph["toy.b"] == {"toy.a": 1, "toy.c": 4}
    assert cycles(graph) == []
