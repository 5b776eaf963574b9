"""The package's import graph has no cycle, counting imports inside functions too (a lazy
import that closes a cycle still couples the two modules both ways)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "faceclip_zoo"


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = path
    return mods


def _imports(path: Path, name: str, mods: dict[str, Path]) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("faceclip_zoo"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("faceclip_zoo"))
    return {m for m in found if m in mods and m != name}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle():
    mods = _modules()
    graph = {name: _imports(path, name, mods) for name, path in mods.items()}
    assert len(graph) > 50
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_finder_finds_cycles():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


# The package's folders from the bottom up. A module may import its own folder, those below
# it and the package's top-level modules (config, utils, the commands), never a folder above:
# the synthetic world sits with data, its benchmark and judges with evaluation.
LAYERS = [{"models"}, {"data", "synthetic"}, {"pipelines"}, {"tasks"}, {"evaluation", "bench"}]


def _folder(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else None


def _layer(folder: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if folder in names)


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for name, imports in sorted(graph.items()):
        here = _folder(name)
        if here is None:
            continue
        for target in sorted(imports):
            there = _folder(target)
            if there is not None and _layer(there) > _layer(here):
                found.append(f"{name} -> {target}")
    return found


def test_no_folder_imports_one_above_it():
    mods = _modules()
    folders = {_folder(m) for m in mods} - {None}
    assert folders == set().union(*LAYERS), "a new folder needs its place in LAYERS"
    graph = {name: _imports(path, name, mods) for name, path in mods.items()}
    assert upward_imports(graph) == []


def test_the_layer_check_finds_an_upward_import():
    graph = {"faceclip_zoo.data.x": {"faceclip_zoo.tasks.y"}, "faceclip_zoo.tasks.y": {"faceclip_zoo.data.x"},
             "faceclip_zoo.cli": {"faceclip_zoo.bench.z"}}
    assert upward_imports(graph) == ["faceclip_zoo.data.x -> faceclip_zoo.tasks.y"]
