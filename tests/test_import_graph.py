"""The package's import graph, read from the source (nothing is imported): no file imports itself back through other
files, and no room (a subpackage or a top-level module of llavaction_jax) imports itself back through other rooms.
Imports inside functions count: a lazy import that closes a circle is still a circle."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "llavaction_jax"


def module_files(package: pathlib.Path) -> dict[str, pathlib.Path]:
    """{"pkg.sub.mod": file} for every .py file; a package is named by its __init__.py."""
    out = {}
    for file in package.rglob("*.py"):
        parts = list(file.relative_to(package.parent).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = file
    return out


def imported_names(module: str, file: pathlib.Path) -> set[str]:
    """Dotted names `module` imports, relative imports made absolute; `from a import b` names both a and a.b."""
    base = module if file.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            origin = node.module or ""
            if node.level:
                anchor = base
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                origin = f"{anchor}.{origin}" if node.module else anchor
            names.add(origin)
            names.update(f"{origin}.{alias.name}" for alias in node.names)
    return names


def file_graph(package: pathlib.Path) -> dict[str, set[str]]:
    """module -> the package modules it imports (a name resolves to its longest module prefix). A package's
    __init__ is not counted as imported by its own modules: importing a submodule runs it, but that is no edge
    of our making."""
    files = module_files(package)
    root = package.name
    graph = {m: set() for m in files}
    for module, file in files.items():
        for name in imported_names(module, file):
            target = name
            while target and target not in files:
                target = target.rpartition(".")[0]
            if not target or target in (module, root):
                continue
            if files[target].name == "__init__.py" and module.startswith(target + "."):
                continue
            graph[module].add(target)
    return graph


def room_graph(graph: dict[str, set[str]], root: str) -> dict[str, set[str]]:
    """The same edges between rooms: llavaction_jax.eval.runner -> "eval", llavaction_jax.api -> "api"."""
    room = lambda m: m.split(".")[1] if m.count(".") else m
    rooms: dict[str, set[str]] = {}
    for module, targets in graph.items():
        if module == root:
            continue
        rooms.setdefault(room(module), set()).update(room(t) for t in targets if room(t) != room(module))
    return rooms


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan's algorithm), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
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
    return found


def test_the_package_has_no_import_cycle_between_files_or_rooms():
    graph = file_graph(PACKAGE)
    assert len(graph) > 90  # the whole package was read
    assert "llavaction_jax.model.llava" in graph["llavaction_jax.losses"]  # edges are found
    assert not cycles(graph), cycles(graph)
    assert not cycles(room_graph(graph, PACKAGE.name)), cycles(room_graph(graph, PACKAGE.name))


def test_the_check_finds_a_cycle_through_a_lazy_import_and_between_rooms(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from . import low\n")  # the package's own re-export: no edge
    (pkg / "sub" / "low.py").write_text("import pkg.top\n")
    (pkg / "top.py").write_text("def f():\n    from .sub.low import g\n")  # a lazy import closes the circle
    (pkg / "other.py").write_text("from pkg import sub\n")  # a room imported through its package: no circle
    graph = file_graph(pkg)
    assert cycles(graph) == [["pkg.sub.low", "pkg.top"]]
    assert cycles(room_graph(graph, "pkg")) == [["sub", "top"]]
