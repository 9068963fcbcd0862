"""kcd's own imports: no module imports another's private name, and no import cycle.

Read from the source with ``ast`` (nothing is imported): every ``import kcd...`` and
``from kcd... import ...``, at module level and inside functions, is an edge of a graph of kcd's
modules. An edge goes to the module named, not to the packages above it (a submodule importing
a sibling runs its package's ``__init__``, which importing its own submodules is not a cycle).
``from kcd.pkg import name`` where ``kcd.pkg.name`` is a module is an edge to that module.
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KCD = REPO / "kcd"

# Imports of another module's private name that are tolerated; (importing module, imported
# module, name). Empty: a name two modules share is public.
KNOWN_PRIVATE_IMPORTS: set[tuple[str, str, str]] = set()

# The layers of README's architecture: core modules never import an engine, directly or not.
CORE = ("kcd.consistency", "kcd.transforms", "kcd.losses", "kcd.models", "kcd.features",
        "kcd.data", "kcd.specs", "kcd.optim")
ENGINES = ("kcd.train", "kcd.run", "kcd.detection", "kcd.statistics", "kcd.evaluate",
           "kcd.analysis", "kcd.tables", "kcd.tracking", "kcd.cli")


def _modules() -> dict[str, Path]:
    """Every module of the kcd package by its dotted name."""
    found = {}
    for path in sorted(KCD.rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _imports(module: str, path: Path, modules: dict[str, Path]):
    """(imported kcd module, private name or None, line) for each of ``module``'s imports."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    aliases: dict[str, str] = {}  # a name bound to a kcd module -> that module
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in modules:
                    yield alias.name, None, node.lineno
                    if alias.asname:
                        aliases[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom):
            source = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = module.split(".")
                if not is_package:
                    package.pop()
                package = package[:len(package) - (node.level - 1)]
                source = ".".join(package + ([source] if source else []))
            if source not in modules:
                continue
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                if submodule in modules:
                    yield submodule, None, node.lineno
                    aliases[alias.asname or alias.name] = submodule
                else:
                    private = alias.name if _is_private(alias.name) else None
                    yield source, private, node.lineno
    # a private name reached through an imported module: `from kcd import train; train._x`
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in aliases and _is_private(node.attr)):
            yield aliases[node.value.id], node.attr, node.lineno


def _graph() -> tuple[dict[str, set[str]], list[tuple[str, str, str, int]]]:
    """kcd's import graph, and every import of another module's private name."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    private = []
    for name, path in modules.items():
        for target, secret, line in _imports(name, path, modules):
            if target != name:
                graph[name].add(target)
                if secret is not None:
                    private.append((name, target, secret, line))
    return graph, private


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as [a, b, ..., a], or None when it has none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_graph_sees_kcds_modules_and_their_imports():
    graph, _ = _graph()
    assert {"kcd", "kcd.launch", "kcd.warm", "kcd.jobs", "kcd.cli", "kcd.data.streams"} <= set(graph)
    assert {"kcd.jobs", "kcd.warm"} <= graph["kcd.launch"]  # module level
    assert "kcd.jobs" in graph["kcd.warm"]  # inside functions
    assert "kcd.cli" in graph["kcd.jobs"]


def test_kcd_has_no_import_cycle():
    graph, _ = _graph()
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_kcd_module_imports_another_modules_private_name():
    _, private = _graph()
    new = [f"{where}:{line} imports {name} from {target}"
           for where, target, name, line in private
           if (where, target, name) not in KNOWN_PRIVATE_IMPORTS]
    assert not new, "private names imported across modules (make them public):\n" + "\n".join(new)


def _within(module: str, packages) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def test_core_modules_never_import_an_engine():
    graph, _ = _graph()
    assert all(any(_within(m, (layer,)) for m in graph) for layer in CORE + ENGINES)
    for start in sorted(m for m in graph if _within(m, CORE)):
        seen, todo = {start}, [start]
        while todo:
            for nxt in graph[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        engines = sorted(m for m in seen if _within(m, ENGINES))
        assert not engines, f"core module {start} imports engine(s) {', '.join(engines)}"


def test_the_cycle_and_private_checks_catch_what_they_should():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    assert _is_private("_proc_stat") and not _is_private("proc_stat")
    assert not _is_private("__version__")
