"""The package is one-way: no import cycle among calibprune's modules, counting every import.

Read from the source with ``ast`` (nothing is imported, torch is not needed): module-level imports, imports inside
functions and under ``if TYPE_CHECKING`` all count, since a cycle closed only by a local import is hidden, not gone.
An import names the module it reads from (``from ..ops.hessian import SUPPORTED`` -> ``calibprune.ops.hessian``;
``from . import registry`` -> the submodule when there is one); the parent packages Python initialises on the way
are not counted (every module would otherwise "import" ``calibprune/__init__.py``).
"""
from __future__ import annotations

import ast
import os
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "calibprune"


def _modules() -> dict[str, Path]:
    """``{dotted name: file}`` of every module of the package (``calibprune/kernels`` is a link; it is followed)."""
    found = {}
    for folder, _, files in os.walk(PACKAGE, followlinks=True):
        for file in files:
            if not file.endswith(".py"):
                continue
            path = Path(folder) / file
            parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    if level == 0:
        return target or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def import_graph() -> dict[str, dict[str, list[str]]]:
    """``{module: {imported module: [names taken]}}`` over the package's own modules."""
    modules = _modules()
    graph: dict[str, dict[str, list[str]]] = {}
    for name, path in modules.items():
        edges: dict[str, list[str]] = {}
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in modules:
                        edges.setdefault(alias.name, []).append(alias.name)
            elif isinstance(node, ast.ImportFrom):
                source = _resolve(name, is_package, node.level, node.module)
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    target = sub if sub in modules else source
                    if target in modules and target != name:
                        edges.setdefault(target, []).append(alias.name)
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_reader_sees_local_and_type_checking_imports(tmp_path):
    """The reader itself: a cycle closed only inside a function, or under TYPE_CHECKING, is found."""
    assert _resolve("calibprune.pruning.loop", False, 1, "registry") == "calibprune.pruning.registry"
    assert _resolve("calibprune.pruning", True, 1, "loop") == "calibprune.pruning.loop"
    assert _resolve("calibprune.pruning.methods.wanda", False, 2, "loop") == "calibprune.pruning.loop"
    graph = {"a": {"b": ["f"]}, "b": {"c": ["g"]}, "c": {"a": ["h"]}, "d": {"a": ["x"]}}
    assert find_cycles(graph) == [["a", "b", "c"]]
    source = "def f():\n    from .b import g\nif TYPE_CHECKING:\n    from .c import h\n"
    found = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom)]
    assert [n.module for n in found] == ["b", "c"]


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    assert len(graph) > 50, f"only {len(graph)} modules read from {PACKAGE}"
    cycles = find_cycles(graph)
    lines = []
    for component in cycles:
        members = set(component)
        lines.append(f"cycle of {len(component)} modules:")
        for source in component:
            for target, names in sorted(graph[source].items()):
                if target in members:
                    lines.append(f"  {source} -> {target}: {', '.join(sorted(set(names)))}")
    assert not cycles, "import cycles (local and TYPE_CHECKING imports count):\n" + "\n".join(lines)
