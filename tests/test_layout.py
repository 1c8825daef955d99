"""The repository's import rules (README "Layout"), checked on the source, lazy imports included:

- ``udfs`` imports nothing of ours but ``udfs``; ``actors`` imports ``actors`` and ``udfs`` only;
- ``jobs.core`` (the engine) never imports a pipeline module (they are named in its registry);
- a pipeline module never imports another pipeline (shared logic lives in actors/ or udfs/);
- no import cycle between any two modules of ours;
- no module of ours is longer than ``MAX_LINES``.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("jobs", "actors", "udfs", "benchmarks")
MAX_LINES = 1000


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            name = ".".join(f.relative_to(ROOT).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = f
    return mods


MODULES = _modules()


def _owner(name: str) -> str | None:
    """The module of ours that an imported dotted name belongs to (None: a library)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(path: Path) -> set[str]:
    """Every module of ours that ``path`` imports, at the top or inside functions."""
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            deps |= {_owner(a.name) for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            deps |= {_owner(f"{node.module}.{a.name}") or _owner(node.module) for a in node.names}
    return {d for d in deps if d}


GRAPH = {m: _imports(p) - {m} for m, p in MODULES.items()}


def _pipeline(module: str) -> str | None:
    """The pipeline a ``jobs`` module belongs to (``jobs.antidote``, ``jobs.mirror_llava``), or None."""
    parts = module.split(".")
    if parts[0] != "jobs" or len(parts) < 2 or parts[1] in ("core", "__main__"):
        return None
    return ".".join(parts[:2])


def test_layers():
    bad = []
    for m, deps in GRAPH.items():
        top = m.split(".")[0]
        for d in deps:
            dtop = d.split(".")[0]
            if (top == "udfs" and dtop != "udfs") or (top == "actors" and dtop not in ("actors", "udfs")) \
                    or (m.startswith("jobs.core") and _pipeline(d)) \
                    or (_pipeline(m) and _pipeline(d) and _pipeline(m) != _pipeline(d)):
                bad.append(f"{m} -> {d}")
    assert not bad, "imports against the layering rules:\n" + "\n".join(sorted(bad))


def test_no_import_cycle():
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_checker_sees_a_cycle_and_a_lazy_import(tmp_path):
    """The graph reads imports inside functions too (the cycle this test guards against ran
    through lazy imports)."""
    f = tmp_path / "m.py"
    f.write_text("def g():\n    from jobs.core import driver\n    import udfs.rows\n")
    assert _imports(f) == {"jobs.core.driver", "udfs.rows"}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_size(module):
    n = len(MODULES[module].read_text().splitlines())
    assert n <= MAX_LINES, f"{module} has {n} lines (split it by topic)"
