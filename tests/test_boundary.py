"""The layers of docs/layers.md: the contract (``extract/core/``) imports neither stage, and
``train/`` imports from ``extract/`` only the contract and the shared plumbing, never the
extractors, the cache, the AVE parser or the Dask set-up of stage 1. Every import of every module
is read with ``ast`` (module level and inside functions, absolute and relative). Modules that
moved into the contract keep their old import path for users (``extract.MOVED``), the same
module object, but code inside ``extract/`` and ``train/`` uses the new one."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "train"
EXTRACT = REPO / "extract"
CORE = EXTRACT / "core"
#: what train may import from extract: the store contract and the shared plumbing (the synthetic
#: store factory writes through the contract only; ``extract.core.frames`` is the frame geometry rule,
#: numpy + cv2, so that avel-predict draws the frames the features were computed from)
#: (``extract.core`` is the contract; the other names are plumbing that has not moved into it yet,
#: docs/layers.md "Steps")
ALLOWED = {"extract.core", "extract.core.settings", "extract.core.clitools", "extract.core.daskclient",
           "extract.core.progress", "extract.factories.synthetic", "extract.core.devices", "extract.core.frames",
           "extract.core.slurm"}  # SLURM worker jobs: shared plumbing (imports daskclient and settings only)


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


def train_modules() -> list[Path]:
    return sorted(TRAIN.rglob("*.py"))


def test_the_scan_sees_function_level_and_package_imports(tmp_path):
    source = "import os\nfrom extract import cache\n\ndef f():\n    from extract.run import main\n"
    path = TRAIN / "_boundary_probe.py"
    try:
        path.write_text(source)
        names = [name for _, name in imported_modules(path)]
    finally:
        path.unlink()
    assert "extract.cache" in names and "extract.run" in names


#: avel-predict (and the whole-pipeline checks gpucheck and precision_report) join the two stages
#: (developers' guide: "predict, which joins them, imports both,
#: in-process"), so its modules may import stage 1
JOINING = ("predict.py", "predict_cli.py", "predict_plots.py", "gpucheck.py", "precision_report.py")


@pytest.mark.parametrize("path", [p for p in train_modules() if p.name not in JOINING],
                         ids=lambda p: str(p.relative_to(TRAIN.parent)))
def test_train_imports_only_the_store_contract_and_plumbing_of_extract(path):
    bad = [f"line {line}: {name}" for line, name in imported_modules(path)
           if (name == "extract" or name.startswith("extract.")) and name != "extract"
           and not any(name == ok or name.startswith(ok + ".") for ok in ALLOWED)]
    assert not bad, f"{path}: imports outside the extract contract: {bad}"


def test_the_synthetic_factory_uses_only_the_store_contract():
    """train may import ``extract.factories.synthetic`` because it imports nothing of stage 1 beyond the contract."""
    path = TRAIN.parent / "extract" / "synthetic.py"
    names = {name for _, name in imported_modules(path) if name.startswith("extract")}
    contract = ("extract.core.store", "extract.core.manifest")
    assert names and all(any(n == ok or n.startswith(ok + ".") for ok in contract) for n in names), names


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def in_tree_modules() -> list[Path]:
    return sorted(EXTRACT.rglob("*.py")) + train_modules()


@pytest.mark.parametrize("path", sorted(CORE.rglob("*.py")), ids=lambda p: str(p.relative_to(REPO)))
def test_the_contract_imports_neither_stage(path):
    """Floor 0: a module of ``extract/core/`` imports only ``extract.core`` (and third-party code)."""
    bad = [f"line {line}: {name}" for line, name in imported_modules(path)
           if name.split(".")[0] in ("extract", "train") and not (name == "extract.core" or name.startswith("extract.core."))]
    assert not bad, f"{path}: the contract imports a stage: {bad}"


def test_the_contract_has_no_import_cycle():
    """The import graph inside ``extract.core`` (every import, function-level ones included) is acyclic."""
    modules = {module_name(p): p for p in CORE.rglob("*.py")}
    graph = {name: {dep for _, dep in imported_modules(path) if dep in modules and dep != name}
             for name, path in modules.items()}
    done, active = set(), []

    def visit(name):
        if name in active:
            raise AssertionError("import cycle: " + " -> ".join(active[active.index(name):] + [name]))
        if name in done:
            return
        active.append(name)
        for dep in sorted(graph[name]):
            visit(dep)
        active.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)
    assert {"extract.core.store", "extract.core.manifest", "extract.core.lock"} <= done


def test_the_cycle_check_finds_a_cycle():
    """The check above can fail: two probe modules that import each other inside functions."""
    probe = CORE / "_cycle_probe"
    probe.mkdir()
    try:
        (probe / "__init__.py").write_text("")
        (probe / "a.py").write_text("def f():\n    from .b import g\n")
        (probe / "b.py").write_text("from .a import f\n\ndef g():\n    return f\n")
        with pytest.raises(AssertionError, match="import cycle"):
            test_the_contract_has_no_import_cycle()
    finally:
        for child in probe.iterdir():
            child.unlink()
        probe.rmdir()


@pytest.mark.parametrize("path", in_tree_modules(), ids=lambda p: str(p.relative_to(REPO)))
def test_in_tree_code_uses_the_new_paths(path):
    """The old paths of moved modules are for users; ``extract/`` and ``train/`` import the new ones."""
    from extract import MOVED

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
