"""No import circles among the project's own modules (kdiga, pipeline, bench).

The graph is read from the source with ``ast``: every ``import`` and ``from ... import``, at the
top of a module or inside a function, relative imports resolved, and ``from pkg import name``
counted as an import of ``pkg.name`` when that is a module. Imports under ``if TYPE_CHECKING:``
count too: they never run, but two modules that each name the other's types still make one
topic split in two. A circle is named module by module, so it can be cut where the design
says (the table builds the thing; the thing never looks itself up in the table).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kdiga", "pipeline", "bench")

#: circles known and left for their modules' owners, each written as the modules in the order
#: they import each other; any other circle fails the test
ALLOWED: frozenset[tuple[str, ...]] = frozenset()


def _modules(root: Path, packages: tuple[str, ...]) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (its file, whether it is a package's ``__init__``)."""
    out = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            out[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return out


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, at any depth (under TYPE_CHECKING too)."""
    found, todo = [], [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        todo.extend(ast.iter_child_nodes(node))
    return found


def _own(name: str, modules: dict) -> str | None:
    """The project module ``name`` is or lies in (``kdiga.models.io.load`` -> kdiga.models.io)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    """Each module of ``packages`` under ``root`` -> the modules of theirs it imports."""
    modules = _modules(root, packages)
    graph = {}
    for name, (path, is_package) in modules.items():
        package = name if is_package else name.rpartition(".")[0]
        deps = set()
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps |= {_own(alias.name, modules) for alias in node.names}
                continue
            base = node.module or ""
            if node.level:  # relative: from the package, one level up per extra dot
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            for alias in node.names:
                full = f"{base}.{alias.name}"
                deps.add(full if full in modules else _own(base, modules))
        deps.discard(None)
        deps.discard(name)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[tuple[str, ...]]:
    """The circles: in each group of modules that import each other (Tarjan's strongly
    connected components), the shortest circle through each module, as the modules in import
    order starting from the smallest name."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while not group or group[-1] != v:
                group.append(stack.pop())
            if len(group) > 1:
                groups.append(set(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    found = {_circle(graph, group, start) for group in groups for start in group}
    return sorted(found)


def _circle(graph: dict[str, set[str]], group: set[str], start: str) -> tuple[str, ...]:
    """The shortest way from ``start`` back to itself within ``group``, rotated to begin at
    its smallest name (the same circle found from each of its modules reads the same)."""
    paths = {start: (start,)}
    todo = [start]
    while todo:
        v = todo.pop(0)
        for w in sorted(graph[v] & group):
            if w == start:
                at = paths[v].index(min(paths[v]))
                return paths[v][at:] + paths[v][:at]
            if w not in paths:
                paths[w] = (*paths[v], w)
                todo.append(w)
    raise AssertionError(f"no circle in {sorted(group)}")


def test_the_graph_sees_top_level_function_level_and_relative_imports(tmp_path):
    files = {
        "p/__init__.py": "",
        "p/a.py": "import p.b\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
        "    from p import e\n",
        "p/b.py": "def f():\n    from p.c import thing\n",
        "p/c.py": "from . import d\nfrom .sub.x import y\nimport os\n",
        "p/d.py": "from p import c as _c\nfrom p.sub import x\n",
        "p/e.py": "",
        "p/sub/__init__.py": "from ..e import *\n",
        "p/sub/x.py": "from .. import a\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = import_graph(tmp_path, ("p",))
    assert graph == {
        "p": set(),
        "p.a": {"p.b", "p.e"},  # a TYPE_CHECKING import counts
        "p.b": {"p.c"},  # inside a function
        "p.c": {"p.d", "p.sub.x"},  # relative, and from a package import a module
        "p.d": {"p.c", "p.sub.x"},
        "p.e": set(),
        "p.sub": {"p.e"},
        "p.sub.x": {"p.a"},
    }
    assert cycles(graph) == [("p.a", "p.b", "p.c", "p.sub.x"), ("p.c", "p.d")]


def test_cycles_are_found_and_named():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e2"}, "e2": {"e"}}
    assert sorted(cycles(graph)) == [("a", "b", "c"), ("e", "e2")]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles_among_the_projects_modules():
    found = cycles(import_graph())
    new = [c for c in found if c not in ALLOWED]
    assert not new, "import circles: " + "; ".join(" -> ".join([*c, c[0]]) for c in new)
    gone = ALLOWED - set(found)
    assert not gone, f"allowed circles no longer there (remove them from ALLOWED): {sorted(gone)}"
