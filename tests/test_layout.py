"""The package's layout: no import circle, no branch on a backend's name outside the
backends, every registered backend implements the interface (issue 12).

Read from the source with :mod:`ast`, function-level imports included; imports under
``if TYPE_CHECKING:`` are left out (they never run).
"""

from __future__ import annotations

import ast
import inspect
from collections.abc import Iterator
from pathlib import Path

import pytest

import remote_exec

PACKAGE = Path(remote_exec.__file__).resolve().parent
ROOT = PACKAGE.parent
NAME = "remote_exec"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    """Every module of the package (a package's ``__init__`` under the package's name)."""
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def walk_runtime(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node of ``tree`` except the bodies of ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                stack.extend(child.orelse)
                continue
            stack.append(child)


def _known(name: str, known: dict[str, Path]) -> str | None:
    """The longest module of the package ``name`` is or lies in."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str, path: Path, known: dict[str, Path]) -> dict[str, int]:
    """The modules of the package ``module`` imports -> the line of the first import."""
    found: dict[str, int] = {}
    is_package = path.name == "__init__.py"

    def add(target: str | None, line: int) -> None:
        if target and target != module:
            found.setdefault(target, line)

    for node in walk_runtime(parse(path)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == NAME:
                    add(_known(alias.name, known), node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = module.split(".")
                if not is_package:
                    base_parts.pop()
                base_parts = base_parts[:len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] != NAME:
                continue
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                add(submodule if submodule in known else _known(base, known), node.lineno)
    return found


def import_graph() -> dict[str, dict[str, int]]:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph.get(node, {}):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                item = stack.pop()
                on_stack.discard(item)
                component.append(item)
                if item == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def describe(component: list[str], graph: dict[str, dict[str, int]]) -> str:
    """One circle: its modules and the imports inside it (``a -> b (line)``)."""
    members = set(component)
    edges = [f"    {a} -> {b} (line {line})" for a in component
             for b, line in sorted(graph[a].items()) if b in members]
    return " / ".join(component) + "\n" + "\n".join(edges)


def test_no_import_circle_in_the_package():
    graph = import_graph()
    assert "remote_exec.holder.client" in graph  # (the walk sees subpackages)
    circles = strongly_connected(graph)
    assert not circles, "import circles (function-level imports included):\n" + "\n".join(
        describe(c, graph) for c in circles)


def test_the_holder_client_and_wire_stay_light():
    """What ``remote-exec run`` imports to reach the holder never reaches asyncssh or the
    engine; the wire format imports only the run's data and the errors."""
    graph = import_graph()
    assert set(graph["remote_exec.holder.wire"]) <= {"remote_exec.errors", "remote_exec.request"}
    reached: set[str] = set()
    todo = ["remote_exec.holder", "remote_exec.holder.client"]
    while todo:
        name = todo.pop()
        if name not in reached:
            reached.add(name)
            todo.extend(graph[name])
    assert not reached & {"remote_exec.holder.server", "remote_exec.engine",
                          "remote_exec.ssh.link", "remote_exec.ssh.connect"}, sorted(reached)
    for name in reached:
        tree = parse(modules()[name])
        heavy = [n.lineno for n in walk_runtime(tree)
                 if (isinstance(n, ast.Import) and any(a.name.startswith("asyncssh")
                                                       for a in n.names))
                 or (isinstance(n, ast.ImportFrom) and (n.module or "").startswith("asyncssh"))]
        assert not heavy, f"{name} imports asyncssh (lines {heavy})"


# -- branches on a backend's name ---------------------------------------------------------

def backend_names() -> set[str]:
    from remote_exec import backends

    return set(backends.names())


def _string_constants(node: ast.expr) -> list[str]:
    """The string constants ``node`` is or holds (a tuple, list or set of them)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [e.value for e in node.elts
                if isinstance(e, ast.Constant) and isinstance(e.value, str)]
    return []


def _pattern_strings(pattern: ast.pattern) -> list[str]:
    if isinstance(pattern, ast.MatchValue):
        return _string_constants(pattern.value)
    if isinstance(pattern, ast.MatchOr):
        return [s for p in pattern.patterns for s in _pattern_strings(p)]
    if isinstance(pattern, ast.MatchAs) and pattern.pattern is not None:
        return _pattern_strings(pattern.pattern)
    return []


def _backend_imports(tree: ast.Module, module: str) -> set[str]:
    """Local names bound by imports from ``remote_exec.backends`` (classes or modules)."""
    bound: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                parts = module.split(".")[:-node.level]
                base = ".".join(parts + ([base] if base else []))
            if base == f"{NAME}.backends" or base.startswith(f"{NAME}.backends."):
                bound.update(a.asname or a.name for a in node.names)
            elif base == NAME:
                bound.update(a.asname or a.name for a in node.names if a.name == "backends")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith(f"{NAME}.backends") and alias.asname:
                    bound.add(alias.asname)
    return bound


def _is_backend_class(node: ast.expr, bound: set[str]) -> bool:
    if isinstance(node, ast.Name):
        return node.id.endswith("Backend") and node.id in bound
    if isinstance(node, ast.Attribute):
        root = node.value
        while isinstance(root, ast.Attribute):
            root = root.value
        return node.attr.endswith("Backend") and (
            (isinstance(root, ast.Name) and root.id in bound)
            or ast.unparse(node.value).startswith(f"{NAME}.backends"))
    return False


def backend_branches(path: Path, module: str, names: set[str], root: Path = ROOT) -> list[str]:
    """``path:line: code`` for each comparison with a backend's name, ``case`` on one,
    and ``isinstance`` on a backend class."""
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source, filename=str(path))
    lines = source.splitlines()
    bound = _backend_imports(tree, module)
    found: list[int] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            if any(isinstance(op, (ast.Eq, ast.NotEq, ast.In, ast.NotIn, ast.Is, ast.IsNot))
                   for op in node.ops) and any(
                    s in names for side in (node.left, *node.comparators)
                    for s in _string_constants(side)):
                found.append(node.lineno)
        elif isinstance(node, ast.match_case):
            if any(s in names for s in _pattern_strings(node.pattern)):
                found.append(node.pattern.lineno)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("isinstance", "issubclass") and len(node.args) == 2):
            classes = node.args[1]
            candidates = classes.elts if isinstance(classes, ast.Tuple) else [classes]
            if any(_is_backend_class(c, bound) for c in candidates):
                found.append(node.lineno)
    where = path.relative_to(root)
    return [f"{where}:{line}: {lines[line - 1].strip()}" for line in sorted(set(found))]


def test_no_backend_name_branches_outside_backends():
    names = backend_names()
    assert {"direct", "slurm", "agent", "fujitsu"} <= names
    offenders = []
    for module, path in modules().items():
        if module == f"{NAME}.backends" or module.startswith(f"{NAME}.backends."):
            continue
        offenders += backend_branches(path, module, names)
    assert not offenders, ("branches on a backend outside remote_exec/backends/:\n"
                           + "\n".join(offenders))


def test_the_backend_branch_finder_sees_each_form(tmp_path: Path):
    """(the checker itself: each form it must catch, and what it must leave alone)"""
    code = '''from remote_exec.backends.agent import AgentBackend
from remote_exec import backends
kind = "direct"
if kind == "slurm":
    pass
if kind not in ("pbs", "x"):
    pass
if "fujitsu" != kind:
    pass
match kind:
    case "agent" | "other":
        pass
if isinstance(kind, AgentBackend):
    pass
if isinstance(kind, (int, backends.batch.BatchBackend)):
    pass
if kind == "something else" or kind in ("a", "b"):
    pass
'''
    path = tmp_path / "sample.py"
    path.write_text(code)
    found = backend_branches(path, f"{NAME}.sample", backend_names(), root=tmp_path)
    assert [f.split(":")[1] for f in found] == ["4", "6", "8", "11", "13", "15"], found


# -- the interface ------------------------------------------------------------------------

def test_every_backend_implements_the_interface():
    from remote_exec import backends
    from remote_exec.backends.base import Backend

    problems = []
    for entry in backends.BUILT_IN:
        try:
            cls = entry.load()
        except Exception as exc:  # noqa: BLE001 - each failure is listed
            problems.append(f"{entry.name}: {entry.target} does not load: {exc!r}")
            continue
        if not (isinstance(cls, type) and issubclass(cls, Backend)):
            problems.append(f"{entry.name}: {entry.target} is not a Backend")
        elif inspect.isabstract(cls):
            missing = sorted(getattr(cls, "__abstractmethods__", ()))
            problems.append(f"{entry.name}: {entry.target} leaves abstract: "
                            + ", ".join(missing))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("graph, circles", [
    ({"a": {"b": 1}, "b": {"a": 2}, "c": {"a": 3}}, [["a", "b"]]),
    ({"a": {"b": 1}, "b": {"c": 2}, "c": {}}, []),
])
def test_the_circle_finder(graph, circles):
    """(the checker itself)"""
    assert strongly_connected(graph) == circles
