"""train.runner: one run put together from task + loop exactly as before the move out of Task,
one run-folder rule for the CLI and sweeps (a failed run leaves no folder), and
``avel-train evaluate --run RUN`` giving the run's own figures from any folder."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from extract.core.settings import load_pipeline
from train import runner
from train.checkpoint import load_checkpoint
from train.cli import main
from train.runs import read_epochs_csv
from train_testutils import TEST_HEAD, make_dataset, registered_test_head

torch.set_num_threads(1)
#: metrics.json entries that differ between two runs of the same seed (time, place)
UNSTABLE = {"wall_seconds", "train_seconds", "run_dir", "project_dir"}


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("runner"), T=10, sizes=(12, 6, 6))


@pytest.fixture(autouse=True)
def linear_head():
    with registered_test_head() as cls:
        yield cls


def pipeline_of(ds, **train):
    return load_pipeline(ds["pipeline"], {"train": {"epochs": 3, "device": "cpu", "threads": 1, "head": TEST_HEAD, **train}})


def seed_folders(root):
    return sorted(p for p in root.rglob("seed*") if p.is_dir()) if root.exists() else []


@pytest.fixture(scope="module")
def trained(ds):
    """One run of the test head, in the project's runs_root (relative: ``runs``)."""
    with registered_test_head():
        metrics = runner.run(pipeline_of(ds), TEST_HEAD, 0)
    return metrics


def test_run_is_the_old_task_run_step_by_step(ds, trained, tmp_path):
    """The steps of ``Task.setup`` + ``Task.run`` as they were before the runner (commit f2764e7,
    train/tasks/base.py:193-290: threads, device, prepare, seed, head, attach, schedule, fit,
    task metrics), by hand: the same weights bit for bit and the same task figures."""
    from train.data import resolve_device
    from train.loop import fit, resolve_schedule, seed_everything
    from train.registry import get_task

    pipeline = pipeline_of(ds)
    torch.set_num_threads(1)
    device = resolve_device("cpu")
    task = get_task("avel").prepare(pipeline, device)
    seed_everything(0, device)
    model = task.build_head(TEST_HEAD)
    task.attach(model)
    result = fit(model, task, resolve_schedule(pipeline.train, type(model)), 0)
    own = task.metrics(model, result)

    state, meta = load_checkpoint(f"{trained['run_dir']}/checkpoint.safetensors")
    assert state.keys() == result.best_state.keys()
    for key, value in result.best_state.items():
        assert torch.equal(state[key], value), key
    assert meta["selected_epoch"] == result.best_epoch == trained["selected_epoch"]
    written = json.loads((runner.Path(trained["run_dir"]) / "metrics.json").read_text())
    for key in ("val_accuracy", "test_accuracy", "val", "test", "baseline", "samples"):
        assert written[key] == json.loads(json.dumps(own[key])), key
    assert [r["epoch"] for r in read_epochs_csv(runner.Path(trained["run_dir"]) / "epochs.csv")] == ["1", "2", "3"]
    # and a second run of the same seed through the runner is the same run
    again = runner.run(pipeline_of(ds), TEST_HEAD, 0, tmp_path / "again")
    assert {k: v for k, v in again.items() if k not in UNSTABLE} == {k: v for k, v in trained.items() if k not in UNSTABLE}


def _break(monkeypatch, where: str) -> None:
    from train.tasks.avel_task import AvelTask

    def fail(*args, **kwargs):
        raise RuntimeError(f"{where} broke")

    monkeypatch.setattr(AvelTask, where, fail)


@pytest.mark.parametrize("where", ["metrics", "write_outputs"])  # before anything is written / after metrics.json
def test_a_cli_run_that_fails_after_its_folder_was_made_leaves_no_folder(ds, tmp_path, monkeypatch, where):
    _break(monkeypatch, where)
    made = []
    real = runner.run_folder

    def watched(*args, **kwargs):
        cm = real(*args, **kwargs)
        folder = cm.__enter__()
        made.append(folder)
        return _Entered(cm, folder)

    monkeypatch.setattr(runner, "run_folder", watched)
    res = CliRunner().invoke(main, ["--config", str(ds["pipeline"]), "--head", TEST_HEAD, "--epochs", "1", "--threads", "1",
                                    "--set", f"train.runs_root={tmp_path / 'runs'}"])
    assert isinstance(res.exception, RuntimeError) and f"{where} broke" in str(res.exception)
    assert len(made) == 1 and f"seed 0: {made[0]}" in res.output  # the folder was made, and announced
    assert not made[0].exists() and not made[0].parent.exists()  # ... and removed with its group folder
    assert seed_folders(tmp_path / "runs") == []


class _Entered:
    """A context manager already entered (lets a test see the folder a run made)."""

    def __init__(self, cm, folder):
        self.cm, self.folder = cm, folder

    def __enter__(self):
        return self.folder

    def __exit__(self, *exc):
        return self.cm.__exit__(*exc)


@pytest.mark.parametrize("where", ["metrics", "write_outputs"])
def test_a_sweep_run_that_fails_after_its_folder_was_made_leaves_no_folder(ds, tmp_path, monkeypatch, where):
    from train.sweep import RunSpec, run_sweep

    _break(monkeypatch, where)
    pipeline = pipeline_of(ds, epochs=1, runs_root=str(tmp_path / "runs"))
    (row,) = run_sweep(pipeline, [RunSpec(TEST_HEAD, "supervised", 0)])
    assert row["error"] == f"RuntimeError: {where} broke"
    assert (tmp_path / "runs").is_dir()  # the runs root was made: the run got as far as its folder
    assert seed_folders(tmp_path / "runs") == [] and list((tmp_path / "runs").iterdir()) == []


def test_a_given_run_folder_that_existed_is_kept(ds, tmp_path, monkeypatch):
    _break(monkeypatch, "metrics")
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(RuntimeError):
        runner.run(pipeline_of(ds, epochs=1), TEST_HEAD, 0, folder)
    assert (folder / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------------------------------------
# avel-train evaluate --run RUN


def test_evaluate_gives_the_runs_figures_from_any_folder(trained, tmp_path, monkeypatch):
    run_dir = runner.Path(trained["run_dir"])
    elsewhere = tmp_path / "empty"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # no pipeline.yaml, no store here: everything comes from the run
    written = json.loads((run_dir / "metrics.json").read_text())
    res = CliRunner().invoke(main, ["evaluate", "--run", str(run_dir), "--json-out", "test.json"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert f"test accuracy: {written['test_accuracy']:.4f}" in res.output.splitlines()
    report = json.loads((elsewhere / "test.json").read_text())
    assert report["metrics"]["test_accuracy"] == written["test_accuracy"]  # exactly, not approximately
    assert report["metrics"]["test"] == written["test"]  # per-class accuracy, confusion, loss
    assert report["store"] == written["store"] and report["split_name"] == "test"

    res = CliRunner().invoke(main, ["evaluate", "--run", str(run_dir), "--split", "val", "--json-out", "val.json"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    val = json.loads((elsewhere / "val.json").read_text())["metrics"]["val_accuracy"]
    assert val == written["val_accuracy"]
    selected = read_epochs_csv(run_dir / "epochs.csv")[written["selected_epoch"] - 1]
    assert float(selected["val_accuracy"]) == pytest.approx(val, abs=1e-6)  # the selected epoch's (6 digits in the csv)


def test_evaluate_refuses_a_folder_without_checkpoint(tmp_path):
    folder = tmp_path / "not-a-run"
    folder.mkdir()
    res = CliRunner().invoke(main, ["evaluate", "--run", str(folder)])
    assert res.exit_code == 2
    assert str(folder) in res.output and "checkpoint.safetensors" in res.output
