"""The direction of dependency, read from the source: ``worker -> app -> sp2ot_engine``, never
back, and no import cycle between files.

Every ``.py`` file under ``app/``, ``worker/`` and ``sp2ot_engine/`` is parsed with ``ast``;
every import statement counts, wherever it stands (module level, inside a function, under
``try`` or ``if TYPE_CHECKING``). The checker itself is tested on small synthetic packages.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("app", "worker", "sp2ot_engine", "sp2ot")
# importer's top-level package -> top-level packages it must never import (sp2ot: the HTTP client)
FORBIDDEN = {"app": {"worker", "sp2ot"}, "sp2ot_engine": {"app", "worker", "sp2ot"},
             "sp2ot": {"app", "worker", "sp2ot_engine"}}


def module_files(root: Path, packages=PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file of ``packages`` under ``root``."""
    out = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _resolve_relative(module: str, is_package: bool, level: int, name: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join([*base, name] if name else base)


def imports_of(module: str, path: Path, modules: set[str]) -> set[str]:
    """The project modules ``module`` (in ``path``) imports: ``from a import b`` counts as
    ``a.b`` when that is a module of the project, else as ``a``. Outside modules are dropped."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = (_resolve_relative(module, is_package, node.level, node.module) if node.level
                    else node.module or "")
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                       for alias in node.names]
        else:
            continue
        for target in targets:
            # `import a.b.c` of a missing module counts as its nearest existing parent.
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != module:
                found.add(target)
    return found


def import_graph(root: Path, packages=PACKAGES) -> dict[str, set[str]]:
    files = module_files(root, packages)
    names = set(files)
    return {m: imports_of(m, p, names) for m, p in files.items()}


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    out = []
    for module, targets in sorted(graph.items()):
        banned = FORBIDDEN.get(module.split(".")[0], set())
        out += [f"{module} imports {t}" for t in sorted(targets) if t.split(".")[0] in banned]
    return out


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected component of more than one
    module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
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
                    components.append(component)
    return [_cycle_through(graph, sorted(c)) for c in components]


def _cycle_through(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """A shortest path from the component's first module back to itself, inside it."""
    members = set(component)
    start = component[0]
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(graph[node] & members):
                if child == start:
                    chain = [node]
                    while chain[-1] != start:
                        chain.append(parents[chain[-1]])
                    return [*reversed(chain), start]
                if child not in parents:
                    parents[child] = node
                    nxt.append(child)
        frontier = nxt
    raise AssertionError(f"no cycle through {start}")  # pragma: no cover - a component always has one


def _report(items) -> str:
    return "\n".join(" -> ".join(c) if isinstance(c, list) else c for c in items)


# ------------------------------------------------------------------------ the project
@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    g = import_graph(REPO)
    assert {"app.main", "worker.celery_app", "sp2ot_engine.clustering", "sp2ot.client"} <= set(g), sorted(g)
    return g


def test_app_never_imports_worker_and_the_engine_neither(graph):
    violations = layer_violations(graph)
    assert not violations, "imports against the direction worker -> app -> sp2ot_engine:\n" + _report(violations)


def test_no_import_cycle_between_files(graph):
    cycles = import_cycles(graph)
    assert not cycles, "import cycles:\n" + _report(cycles)


def test_the_worker_is_a_thin_shell_over_app_jobs(graph):
    assert {m for m in graph if m.startswith("worker")} == {"worker", "worker.celery_app"}
    assert "app.jobs.runner" in graph["worker.celery_app"]


# ------------------------------------------------------------------- the checker itself
def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def test_checker_finds_forbidden_imports_anywhere_in_a_file(tmp_path):
    _write(tmp_path, {
        "app/__init__.py": "",
        "app/good.py": "import sp2ot_engine.core\n",
        "app/bad_top.py": "from worker import tasks\n",
        "app/bad_lazy.py": "def f():\n    import worker.tasks as t\n    return t\n",
        "app/bad_guarded.py": "try:\n    from worker.tasks import run\nexcept ImportError:\n    run = None\n",
        "worker/__init__.py": "",
        "worker/tasks.py": "from app import good\n",
        "sp2ot_engine/__init__.py": "",
        "sp2ot_engine/core.py": "import numpy\n",
        "sp2ot_engine/leak.py": "class A:\n    def m(self):\n        from app.good import x\n",
    })
    g = import_graph(tmp_path)
    assert g["worker.tasks"] == {"app.good"} and g["app.good"] == {"sp2ot_engine.core"}
    assert layer_violations(g) == [
        "app.bad_guarded imports worker.tasks",
        "app.bad_lazy imports worker.tasks",
        "app.bad_top imports worker.tasks",
        "sp2ot_engine.leak imports app.good",
    ]


def test_checker_reports_cycles_with_their_path(tmp_path):
    _write(tmp_path, {
        "app/__init__.py": "",
        "app/a.py": "from app import b\n",
        "app/b.py": "def f():\n    from .c import g\n",
        "app/c.py": "import app.a\n",
        "app/d.py": "from app.a import thing\n",  # leads into the cycle, is not part of it
        "app/sub/__init__.py": "from . import e\n",
        "app/sub/e.py": "from .. import sub\n",  # `from .. import sub` is app.sub: a package cycle
        "worker/__init__.py": "",
        "sp2ot_engine/__init__.py": "",
    })
    g = import_graph(tmp_path)
    assert g["app.b"] == {"app.c"} and g["app.sub.e"] == {"app.sub"}
    cycles = sorted(import_cycles(g))
    assert cycles == [["app.a", "app.b", "app.c", "app.a"], ["app.sub", "app.sub.e", "app.sub"]]
    assert "app.a -> app.b -> app.c -> app.a" in _report(cycles)


def test_checker_passes_a_clean_tree(tmp_path):
    _write(tmp_path, {
        "app/__init__.py": "",
        "app/x.py": "import os\nfrom sp2ot_engine import y\n",
        "worker/__init__.py": "",
        "worker/run.py": "from app.x import z\n",
        "sp2ot_engine/__init__.py": "",
        "sp2ot_engine/y.py": "from . import __name__ as n\n",
    })
    g = import_graph(tmp_path)
    assert layer_violations(g) == [] and import_cycles(g) == []
    assert g["worker.run"] == {"app.x"} and g["app.x"] == {"sp2ot_engine.y"}
