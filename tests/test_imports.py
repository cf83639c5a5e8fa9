"""The package's import graph has no cycle (docs/design.md §8): data flows one way, so a module
never imports, even lazily inside a function, one that imports it back."""

import ast
from pathlib import Path

import hierfedlora

PKG = Path(hierfedlora.__file__).parent


def module_name(path: Path) -> str:
    parts = ("hierfedlora",) + path.relative_to(PKG).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> package modules it imports anywhere in its text (top level or inside functions).
    `from a import b` counts as importing `a.b` when that is a module, else `a`."""
    mods = {module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module
                         for a in node.names}
        graph[name] = {d for d in deps if d in mods and d != name and not name.startswith(d + ".")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    graph = import_graph()
    assert "hierfedlora.engine" in graph and graph["hierfedlora.cli"]  # the graph is really read
    assert cycles(graph) == []


def test_lower_layers_do_not_import_upward():
    """The seams and the method layer know nothing of the engine, the CLI or the model code."""
    graph = import_graph()
    upward = {"hierfedlora.engine", "hierfedlora.cli", "hierfedlora.compare", "hierfedlora.experiment"}
    for low in ("hierfedlora.protocol", "hierfedlora.aggregate", "hierfedlora.clock", "hierfedlora.lora_state"):
        assert not graph[low] & upward, (low, graph[low] & upward)
    for name, deps in graph.items():
        if name.startswith("hierfedlora.strategies"):
            assert not deps & upward, (name, deps & upward)
