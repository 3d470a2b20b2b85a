"""The house's layering, read from the source: every import of every module (also those inside
functions or under TYPE_CHECKING) is an edge. Packages depend downward only — server -> trainer ->
store/engine -> common — and no two modules import each other, directly or around a cycle. The live
adapter version has one owner: only engine/ assigns an `adapter_version` attribute."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "engine", "store", "trainer", "server")
# package -> the project packages it must not import
FORBIDDEN = {
    "common": {"engine", "store", "trainer", "server"},
    "engine": {"trainer", "server"},
    "store": {"engine", "trainer", "server"},
    "trainer": {"server"},
    "server": set(),
}


def module_files() -> dict[str, Path]:
    """'engine.model_runner' -> its path, for every module of the project's packages."""
    files = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join(parts)] = path
    return files


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports anywhere in its source ('from a import b' counts a.b when b
    is a module, else a)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:        # 'engine.x.y' (an attribute) -> 'engine.x'
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    known = set(files)
    return {name: imported_modules(name, path, known) for name, path in files.items()}


def test_the_graph_sees_the_project():
    graph = import_graph()
    assert {"engine.llm_engine", "store.activation_pool", "trainer.online", "server.app"} <= set(graph)
    assert "engine.scheduler" in graph["engine.llm_engine"]      # the reader finds real edges


@pytest.mark.parametrize("package", PACKAGES)
def test_packages_depend_downward_only(package):
    bad = sorted(f"{name} imports {target}" for name, targets in import_graph().items()
                 if name.split(".")[0] == package for target in targets
                 if target.split(".")[0] in FORBIDDEN[package])
    assert not bad, "\n".join(bad)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (iterative DFS, colours white/grey/black)."""
    colour = dict.fromkeys(graph, 0)
    for start in sorted(graph):
        if colour[start]:
            continue
        stack = [(start, iter(sorted(graph[start])))]
        path = [start]
        colour[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                colour[node] = 2
                stack.pop()
                path.pop()
            elif colour.get(child, 2) == 1:
                return path[path.index(child):] + [child]
            elif colour.get(child) == 0:
                colour[child] = 1
                stack.append((child, iter(sorted(graph[child]))))
                path.append(child)
    return None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def adapter_version_writes(path: Path) -> list[int]:
    """Lines that assign an attribute named adapter_version (x.adapter_version = / += ...)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    lines = []
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
        for target in targets:
            for leaf in ast.walk(target):
                if isinstance(leaf, ast.Attribute) and leaf.attr == "adapter_version":
                    lines.append(node.lineno)
    return lines


def test_only_the_engine_assigns_the_adapter_version():
    outside = [f"{path.relative_to(ROOT)}:{line}"
               for folder in ("common", "store", "trainer", "server", "benchmarks", "tests")
               for path in sorted((ROOT / folder).rglob("*.py")) for line in adapter_version_writes(path)]
    assert not outside, "only engine/ sets adapter_version:\n" + "\n".join(outside)
