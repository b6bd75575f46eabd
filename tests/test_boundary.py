"""The layers of docs/layers.md, as floors: a module imports only from its own floor and the
floors below it, the two stages never import each other, and the import graph of ``extract`` and
``train`` has no cycle. Every import of every module is read with ``ast`` (module level and inside
functions, absolute and relative).

    3  join       train.predict.*         may import everything below
    2  stage 1    extract.* (the rest)    stage 2  train.* (the rest)    never each other
    1  factories  extract.factories.*
    0  contract   extract.core.*

Modules that moved keep their old import path for users (``extract.MOVED``, ``train.MOVED``), the
same module object, but code inside ``extract/`` and ``train/`` uses the new one."""
from __future__ import annotations

import ast
import configparser
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "train"
EXTRACT = REPO / "extract"
CORE = EXTRACT / "core"

#: floor -> what it may import of ``extract`` / ``train`` (its own floor included)
MAY_IMPORT = {
    "contract": {"contract"},
    "factories": {"contract", "factories"},
    "stage1": {"contract", "factories", "stage1"},
    "stage2": {"contract", "factories", "stage2"},
    "join": {"contract", "factories", "stage1", "stage2", "join"},
}
#: the drawing's height of each floor (stage 1 and 2 side by side)
HEIGHT = {"contract": 0, "factories": 1, "stage1": 2, "stage2": 2, "join": 3}


def floor(module: str) -> str | None:
    """The floor of an in-tree module name (``None`` for third-party code). The package
    ``extract`` itself (its ``__init__``: the alias table only) counts as the contract, since
    importing any ``extract.core`` module runs it."""
    if module == "extract" or module == "extract.core" or module.startswith("extract.core."):
        return "contract"
    if module == "extract.factories" or module.startswith("extract.factories."):
        return "factories"
    if module.startswith("extract."):
        return "stage1"
    if module == "train.predict" or module.startswith("train.predict."):
        return "join"
    if module == "train" or module.startswith("train."):
        return "stage2"
    return None


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``; ``from pkg import name`` counts as
    ``pkg.name`` too, so ``from extract import cache`` is caught."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def in_tree_modules() -> list[Path]:
    return sorted(EXTRACT.rglob("*.py")) + sorted(TRAIN.rglob("*.py"))


def known_modules() -> set[str]:
    return {module_name(p) for p in in_tree_modules()}


def resolve(name: str, known: set[str]) -> str | None:
    """The in-tree module that an imported name denotes: ``extract.core.store.FeatureStore`` ->
    ``extract.core.store``; ``None`` for third-party names."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def violations(path: Path) -> list[str]:
    here = floor(module_name(path))
    bad = []
    for line, name in imported_modules(path):
        there = floor(name)
        if there is not None and there not in MAY_IMPORT[here]:
            bad.append(f"line {line}: {name} ({here} must not import {there})")
    return bad


def test_every_module_has_a_floor():
    floors = {module_name(p): floor(module_name(p)) for p in in_tree_modules()}
    assert all(floors.values()), [m for m, f in floors.items() if not f]
    assert {"contract", "factories", "stage1", "stage2", "join"} == set(floors.values())


@pytest.mark.parametrize("path", in_tree_modules(), ids=lambda p: str(p.relative_to(REPO)))
def test_imports_go_only_to_the_own_floor_or_below(path):
    bad = violations(path)
    assert not bad, f"{path.relative_to(REPO)} imports across a layer: {bad}"


def test_the_floor_check_can_fail():
    """Planted upward and sideways imports are found: the contract importing a stage, stage 2
    importing stage 1 (inside a function, by a relative name), a factory importing stage 2."""
    probes = {
        CORE / "_floor_probe.py": "from extract.cache import cached_features\n",
        TRAIN / "_floor_probe.py": "def f():\n    from extract import decode\n",
        EXTRACT / "factories" / "_floor_probe.py": "import train.loop\n",
    }
    try:
        for path, source in probes.items():
            path.write_text(source)
        for path in probes:
            assert violations(path), path
    finally:
        for path in probes:
            path.unlink()
    assert not violations(TRAIN / "predict" / "run.py")  # the join floor imports both stages


def import_graph(paths: list[Path]) -> dict[str, set[str]]:
    known = {module_name(p) for p in paths}
    graph = {}
    for path in paths:
        name = module_name(path)
        deps = {resolve(dep, known) for _, dep in imported_modules(path)}
        # a package's own __init__ is run by importing any module below it: not an edge of its own
        graph[name] = {d for d in deps if d and d != name and not name.startswith(d + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    done, active = set(), []

    def visit(name):
        if name in active:
            return active[active.index(name):] + [name]
        if name in done:
            return None
        active.append(name)
        for dep in sorted(graph.get(name, ())):
            cycle = visit(dep)
            if cycle:
                return cycle
        active.pop()
        done.add(name)
        return None

    for name in sorted(graph):
        cycle = visit(name)
        if cycle:
            return cycle
    return None


def test_no_import_cycle_anywhere():
    """The import graph of ``extract`` and ``train`` (every import, function-level ones included)
    is acyclic: each floor can be read, tested and replaced from the bottom up."""
    cycle = find_cycle(import_graph(in_tree_modules()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_finds_a_cycle():
    """The check above can fail: two probe modules that import each other inside functions."""
    probe = CORE / "_cycle_probe"
    probe.mkdir()
    try:
        (probe / "__init__.py").write_text("")
        (probe / "a.py").write_text("def f():\n    from .b import g\n")
        (probe / "b.py").write_text("from .a import f\n\ndef g():\n    return f\n")
        cycle = find_cycle(import_graph(sorted(probe.glob("*.py"))))
        assert cycle and set(cycle) == {"extract.core._cycle_probe.a", "extract.core._cycle_probe.b"}
    finally:
        for child in probe.iterdir():
            child.unlink()
        probe.rmdir()


#: entry-point group -> the floors its modules may sit on
ENTRY_POINT_FLOORS = {
    "console_scripts": {"stage1", "stage2", "join"},
    "avel.config_sections": {"contract", "stage1", "stage2", "join"},
    "avel.heads": {"stage2"},
    "avel.tasks": {"stage2"},
    "avel.extractors": {"stage1"},
    "avel.commands": {"stage1", "stage2", "join"},
}


def entry_points() -> list[tuple[str, str, str]]:
    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg")
    found = []
    for group, text in parser["options.entry_points"].items():
        for line in filter(None, (l.strip() for l in text.splitlines())):
            name, _, target = (part.strip() for part in line.partition("="))
            found.append((group, name, target.partition(":")[0]))
    return found


def test_entry_points_name_modules_on_their_groups_floor():
    """Plugins are found through entry points (docs/layers.md): a head module must be stage 2, an
    extractor stage 1, ... and every module named exists."""
    known = known_modules()
    points = entry_points()
    assert points
    for group, name, module in points:
        assert group in ENTRY_POINT_FLOORS, f"unknown entry-point group {group}"
        assert module in known, f"{group} {name}: no module {module}"
        assert floor(module) in ENTRY_POINT_FLOORS[group], f"{group} {name}: {module} is on floor {floor(module)}"


@pytest.mark.parametrize("path", in_tree_modules(), ids=lambda p: str(p.relative_to(REPO)))
def test_in_tree_code_uses_the_new_paths(path):
    """The old paths of moved modules are for users; ``extract/`` and ``train/`` import the new ones."""
    from extract.core.aliases import MOVED
    import train  # noqa: F401  (installs train's table)

    bad = [f"line {line}: {name} (now {MOVED[old]})" for line, name in imported_modules(path)
           for old in MOVED if name == old or name.startswith(old + ".")]
    assert not bad, f"{path}: imports a moved module by its old path: {bad}"


def test_old_paths_give_the_same_module_object(monkeypatch):
    """``import extract.store`` and ``from extract import manifest`` give the module of
    ``extract.core``, not a copy: a monkeypatch through the old name is seen through the new one."""
    import importlib
    import pickle

    from extract import MOVED

    assert MOVED, "nothing has moved"
    for old, new in MOVED.items():
        assert importlib.import_module(old) is importlib.import_module(new), old
    import extract.core.store
    import extract.store as old_store
    from extract import manifest as old_manifest

    assert old_store is extract.core.store
    assert old_manifest is importlib.import_module("extract.core.manifest")
    assert old_store.FeatureStore.__module__ == "extract.core.store"
    monkeypatch.setattr(old_store, "SCHEMA_VERSION", -1)
    assert extract.core.store.SCHEMA_VERSION == -1
    # a pickle that names the old path (made before the move) still loads
    old_pickle = pickle.dumps(old_store.core_specs, protocol=0).replace(b"extract.core.store", b"extract.store")
    assert b"extract.core.store" not in old_pickle
    assert pickle.loads(old_pickle) is extract.core.store.core_specs
