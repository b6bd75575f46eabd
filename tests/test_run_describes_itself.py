"""A run describes itself (issue 25): ``train.runs.run_pipeline`` gives the configuration the run
was trained with, its relative paths resolved against the folder the training started from,
whatever folder the later command runs in; old runs (no ``project_dir``) and moved projects
are found through ``train.runs_root``."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from extract.core.settings import ConfigError, load_pipeline
from train.runs import PROJECT_DIR, make_run_dir, run_pipeline, write_run


def _project(root: Path, store: str = "data/stores/s.zarr") -> Path:
    root.mkdir(parents=True)
    (root / "pipeline.yaml").write_text(f"store:\n  path: {store}\nsol:\n  boxes_root: data/boxes\n")
    pipeline = load_pipeline(root / "pipeline.yaml")
    run = make_run_dir(pipeline.path(pipeline.train.runs_root), "avel", "dmrn", "supervised", 0)
    write_run(run, pipeline, {"test_accuracy": 0.5}, [])
    return run


def test_the_run_gives_its_own_store_from_any_folder(tmp_path, monkeypatch):
    run = _project(tmp_path / "proj")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "pipeline.yaml").write_text("store:\n  path: other.zarr\n")  # must not be read
    monkeypatch.chdir(elsewhere)
    pipeline = run_pipeline(run)
    assert pipeline.path(pipeline.store.path) == (tmp_path / "proj" / "data/stores/s.zarr").resolve()
    assert pipeline.path(pipeline.sol.boxes_root) == (tmp_path / "proj" / "data/boxes").resolve()
    assert json.loads((run / "metrics.json").read_text())[PROJECT_DIR] == str((tmp_path / "proj").resolve())


def test_overrides_and_an_explicit_config_win(tmp_path, monkeypatch):
    run = _project(tmp_path / "proj")
    monkeypatch.chdir(tmp_path)
    pipeline = run_pipeline(run, overrides={"store": {"path": "/x/y.zarr"}})
    assert pipeline.path(pipeline.store.path) == Path("/x/y.zarr")
    other = tmp_path / "other.yaml"
    other.write_text("store:\n  path: z.zarr\n")
    explicit = run_pipeline(run, config=other)
    assert explicit.path(explicit.store.path) == tmp_path / "z.zarr"


@pytest.mark.parametrize("case", ["old run without project_dir", "project moved"])
def test_runs_root_finds_the_project_of_old_and_moved_runs(tmp_path, monkeypatch, case):
    run = _project(tmp_path / "proj")
    if case == "old run without project_dir":
        metrics = json.loads((run / "metrics.json").read_text())
        del metrics[PROJECT_DIR]
        (run / "metrics.json").write_text(json.dumps(metrics))
        project = tmp_path / "proj"
    else:
        shutil.move(str(tmp_path / "proj"), str(tmp_path / "moved"))
        project = tmp_path / "moved"
        run = project / run.relative_to(tmp_path / "proj")
    monkeypatch.chdir(tmp_path)
    pipeline = run_pipeline(run)
    assert pipeline.path(pipeline.store.path) == (project / "data/stores/s.zarr").resolve()


def test_a_folder_that_is_not_a_run_is_refused_by_name(tmp_path):
    with pytest.raises(ConfigError, match="no config.yaml"):
        run_pipeline(tmp_path)
