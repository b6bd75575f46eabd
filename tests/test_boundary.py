"""The boundary between the stages: ``train/`` imports from ``extract/`` only the store contract
and the shared plumbing, never the extractors, the cache, the AVE parser or the Dask set-up of
stage 1. Every import of every ``train`` module is read with ``ast`` (module level and inside
functions, absolute and relative)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

TRAIN = Path(__file__).resolve().parents[1] / "train"
#: what train may import from extract: the store contract and the shared plumbing (the synthetic
#: store factory writes through the contract only; ``extract.frames`` is the frame geometry rule,
#: numpy + cv2, so that avel-predict draws the frames the features were computed from)
ALLOWED = {"extract.store", "extract.manifest", "extract.settings", "extract.clitools", "extract.daskclient",
           "extract.progress", "extract.synthetic", "extract.devices", "extract.frames",
           "extract.slurm"}  # SLURM worker jobs: shared plumbing (imports daskclient and settings only)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``; ``from pkg import name`` counts as
    ``pkg.name`` too, so ``from extract import cache`` is caught."""
    package = ".".join(path.relative_to(TRAIN.parent).with_suffix("").parts[:-1])
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
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names if base == "extract"]
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
    """train may import ``extract.synthetic`` because it imports nothing of stage 1 beyond the contract."""
    path = TRAIN.parent / "extract" / "synthetic.py"
    names = {name for _, name in imported_modules(path) if name.startswith("extract")}
    assert names and names <= {"extract.store", "extract.manifest"}, names
