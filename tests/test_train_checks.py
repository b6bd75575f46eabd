"""Checks of `avel-train` before and while training (issue 20): every user error is one line on
stderr with exit code 2 and leaves no run folder; a NaN/inf in a training batch or loss stops the
run at that batch; the closing summary and metrics.json give the baseline; --threads; readable
plots (confusion counts, distance colour bars)."""
from __future__ import annotations

import json
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
import zarr
from click.testing import CliRunner
from torch.optim.optimizer import register_optimizer_step_post_hook

from extract.core.manifest import Sample, write_manifest
from extract.core.store import open_store
from train.cli import main
from train_testutils import CLASSES, TEST_HEAD, make_dataset, registered_test_head, write_store

torch.set_num_threads(1)
T = 10
BATCH = 4
SIZES = (12, 6, 6)


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("checks"), T=T, sizes=SIZES)


@pytest.fixture(autouse=True)
def linear_head():
    with registered_test_head() as cls:
        yield cls


def invoke(ds, *args, runs=None):
    """avel-train with the dataset's pipeline; exceptions are NOT caught (a traceback would fail
    the test), so a user error must come back as click's exit code."""
    extra = ["--set", f"train.runs_root={runs}"] if runs is not None else []
    return CliRunner().invoke(main, ["--config", str(ds["pipeline"]), "--head", TEST_HEAD, "--device", "cpu",
                                     *extra, *[str(a) for a in args]], catch_exceptions=False)


def error_lines(res) -> list[str]:
    return [line for line in res.output.splitlines() if line.startswith("Error:")]


def assert_user_error(res, *needles):
    assert res.exit_code == 2, res.output[-2000:]
    (line,) = error_lines(res)  # exactly one line, no traceback
    assert "Traceback" not in res.output
    for needle in needles:
        assert needle in line, line
    return line


# ---------------------------------------------------------------------------------------------
# non-finite inputs and losses


def _store_with(ds, tmp_path, row: int, value: float, array: str = "visual"):
    """A copy of the dataset's store whose row ``row`` holds ``value`` in one element of ``array``."""
    visual, audio = ds["visual"].copy(), ds["audio"].copy()
    target = visual if array == "visual" else audio
    target[row, 3].flat[7] = value
    path = tmp_path / "bad.zarr"
    write_store(path, ds["ids"], visual, audio, np.ones((len(ds["ids"]), T), bool), T)
    return path


@pytest.mark.parametrize("value, array", [(float("nan"), "visual"), (float("inf"), "audio")])
def test_a_non_finite_feature_stops_training_at_its_batch(ds, tmp_path, value, array):
    # the batch order of epoch 1 is torch.randperm(n) drawn from a generator seeded with the seed
    order = torch.randperm(SIZES[0], generator=torch.Generator().manual_seed(0)).tolist()
    position = 9  # the 10th sample of the epoch: batch 2 of 3
    row = order[position]  # train samples are the store's first rows, in manifest order
    bad = _store_with(ds, tmp_path, row, value, array)
    steps = []
    handle = register_optimizer_step_post_hook(lambda *args: steps.append(1))
    try:
        res = invoke(ds, "--store", bad, "--epochs", 2, "--batch-size", BATCH, runs=tmp_path / "runs")
    finally:
        handle.remove()
    k = position // BATCH
    key = ds["ids"][row]
    kind = "NaN" if value != value else "inf"
    line = assert_user_error(res, f"epoch 1, batch {k} (", f"input '{array}' holds {kind}", f"1 of {BATCH} rows (videos {key})")
    assert len(steps) == k  # the batches before it were trained, it was not
    assert "nothing is trained on non-finite numbers" in line
    assert not list((tmp_path / "runs").rglob("seed*"))  # the (empty) run folder was removed again


def test_a_non_finite_loss_stops_training(ds, tmp_path):
    res = invoke(ds, "--epochs", 1, "--batch-size", BATCH, "--set", "heads.test-linear.scale=.nan", runs=tmp_path / "runs")
    assert_user_error(res, "epoch 1, batch 0 (videos ", "the training loss is nan although every input of the batch is finite")


def test_check_batch_finite_names_the_store_array_of_an_input():
    from train.loop import NonFiniteError, check_batch_finite

    task = SimpleNamespace(input_arrays={"visual": "frame_maps"}, batch_videos=lambda b: ["a (second 1)", "b (second 0)"])
    batch = {"visual": torch.zeros(2, 3), "labels": torch.zeros(2, dtype=torch.long)}
    check_batch_finite(task, batch, 1, 0)
    batch["visual"][1, 2] = float("-inf")
    with pytest.raises(NonFiniteError, match=r"epoch 4, batch 7 .*input 'visual' \(store array 'frame_maps'\) holds inf "
                                             r"in 1 of 2 rows \(videos b \(second 0\)\)"):
        check_batch_finite(task, batch, 4, 7)


# ---------------------------------------------------------------------------------------------
# checks before the first epoch: one line, exit 2, no run folder


def test_missing_store(ds, tmp_path):
    res = invoke(ds, "--store", tmp_path / "no" / "such.zarr", runs=tmp_path / "runs")
    assert_user_error(res, "no feature store there")
    assert not (tmp_path / "runs").exists()


def test_sol_on_a_store_without_maps(ds, tmp_path):
    res = CliRunner().invoke(main, ["--config", str(ds["pipeline"]), "--task", "sol", "--head", "stm", "--device", "cpu",
                                    "--set", f"train.runs_root={tmp_path / 'runs'}"], catch_exceptions=False)
    assert_user_error(res, "frame_maps", "resnet152_maps,vggish_maps")
    assert not (tmp_path / "runs").exists()


def test_incomplete_store(ds, tmp_path):
    copy = tmp_path / "copy.zarr"
    shutil.copytree(ds["store"], copy)
    open_store(copy, mode="r+").set_attrs(complete=False)
    res = invoke(ds, "--store", copy, runs=tmp_path / "runs")
    assert_user_error(res, "incomplete")
    assert not (tmp_path / "runs").exists()


def test_wrong_array_shape(ds, tmp_path):
    copy = tmp_path / "copy.zarr"
    shutil.copytree(ds["store"], copy)
    group = zarr.open_group(str(copy), mode="r+")
    del group["audio"]
    group.create_array("audio", shape=(len(ds["ids"]), T, 64), dtype="float32")
    res = invoke(ds, "--store", copy, runs=tmp_path / "runs")
    assert_user_error(res, str(copy), "audio")
    assert not (tmp_path / "runs").exists()


def test_manifest_sample_without_a_store_row(ds, tmp_path):
    samples = list(ds["samples"]["test"]) + [Sample("extra", "not-extracted", "x.mp4", "dog", 0, 3, "test")]
    manifest = write_manifest(tmp_path / "test.csv", samples, CLASSES)
    res = invoke(ds, "--set", f"data.splits.test.manifest={manifest}", runs=tmp_path / "runs")
    assert_user_error(res, "1 of 7 samples have no row in the store", "not-extracted")
    assert not (tmp_path / "runs").exists()


def test_manifests_with_different_classes(ds, tmp_path):
    manifest = write_manifest(tmp_path / "test.csv", ds["samples"]["test"], CLASSES + ["cat"])
    res = invoke(ds, "--set", f"data.splits.test.manifest={manifest}", runs=tmp_path / "runs")
    assert_user_error(res, "class list differs")
    assert not (tmp_path / "runs").exists()


def test_unknown_device_and_bad_head_option(ds, tmp_path):
    if not torch.cuda.is_available():
        res = invoke(ds, "--device", "cuda", runs=tmp_path / "runs")
        assert_user_error(res, "no CUDA device")
    res = invoke(ds, "--set", "heads.test-linear.nosuch=1", runs=tmp_path / "runs")
    assert res.exit_code == 2 and "nosuch" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------
# a run: threads, baseline in the summary and metrics.json


def majority_share(samples, segments: int) -> tuple[float, str]:
    counts: dict[str, int] = {}
    for s in samples:
        event = max(0, min(segments, s.offset) - max(0, s.onset)) if s.category else 0
        counts[s.category] = counts.get(s.category, 0) + event
        counts["background"] = counts.get("background", 0) + segments - event
    top = max(counts, key=counts.get)
    return counts[top] / (segments * len(samples)), top


def _run_dir(root):
    (run,) = sorted((root).rglob("seed0-*"))
    return run


def test_threads_and_majority_baseline_in_summary_and_metrics(ds, tmp_path):
    res = invoke(ds, "--epochs", 2, "--threads", 1, runs=tmp_path / "one")
    assert res.exit_code == 0, res.output
    assert torch.get_num_threads() == 1
    run = _run_dir(tmp_path / "one")
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["threads"] == 1
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["threads"] == 1
    share, label = majority_share(ds["samples"]["test"], T)
    val_share, _ = majority_share(ds["samples"]["val"], T)
    base = metrics["baseline"]
    assert base["test_accuracy"]["value"] == pytest.approx(share)
    assert base["val_accuracy"]["value"] == pytest.approx(val_share)
    assert label in base["test_accuracy"]["method"] and "majority class" in base["test_accuracy"]["method"]
    last = res.output.splitlines()[-1]
    assert last.startswith(f"test accuracy: {metrics['test_accuracy']:.4f}; baseline {share:.4f} (majority class")

    # default: every core, recorded
    res = invoke(ds, "--epochs", 1, runs=tmp_path / "all")
    assert res.exit_code == 0, res.output
    run = _run_dir(tmp_path / "all")
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["threads"] == os.cpu_count()
    assert json.loads((run / "metrics.json").read_text())["threads"] == torch.get_num_threads() == os.cpu_count()
    torch.set_num_threads(1)


def test_summary_of_seeds_holds_the_baseline(ds, tmp_path):
    res = invoke(ds, "--epochs", 1, "--seeds", "0,1", "--threads", 1, runs=tmp_path / "runs")
    assert res.exit_code == 0, res.output
    (group,) = (tmp_path / "runs").glob(f"avel-{TEST_HEAD}-supervised")
    summary = json.loads((group / "summary.json").read_text())
    share, _ = majority_share(ds["samples"]["test"], T)
    assert summary["baseline"]["test_accuracy"]["value"] == pytest.approx(share)
    md = (group / "summary.md").read_text()
    assert f"| baseline | {majority_share(ds['samples']['val'], T)[0]:.4f} | {share:.4f} |" in md


# ---------------------------------------------------------------------------------------------
# pictures


def test_confusion_cells_show_counts(tmp_path):
    from matplotlib import image as mpimg

    from train import plots

    cm = np.array([[5, 0, 1], [2, 3, 0], [0, 0, 7]])
    texts = plots.confusion_cell_texts(cm)
    assert texts.tolist() == [["5", "", "1"], ["2", "3", ""], ["", "", "7"]]
    fig = plots.confusion_figure(cm, ["dog", "car", "background"], "t")
    drawn = sorted((t.get_text(), t.get_position()) for t in fig.axes[0].texts)
    assert drawn == sorted((str(cm[i, j]), (j, i)) for i in range(3) for j in range(3) if cm[i, j])
    assert len(fig.axes) == 2  # the matrix and its colour bar
    path = plots.save_figure(fig, tmp_path / "c.png")
    assert min(mpimg.imread(path).shape[:2]) >= 256


def test_distance_plots_have_a_colour_bar(tmp_path):
    from matplotlib import image as mpimg

    from train.cml_metrics import CmlQuery
    from train.tasks.cml_task import distances_figure, plot_distances

    query = CmlQuery("s0", "v0", 2, 3)
    res = SimpleNamespace(distances=np.random.default_rng(0).random((1, T, T)),
                          predictions={"a2v": np.array([2]), "v2a": np.array([4])},
                          metrics={"a2v_acc": 100.0, "v2a_acc": 0.0, "chance_acc": 12.5})
    split = SimpleNamespace(queries=[query])
    fig = distances_figure(res, split, "cml", 1)
    assert len(fig.axes) == 2
    assert fig.axes[1].get_ylabel().startswith("distance")
    path = plot_distances(res, split, tmp_path / "d.png", "cml", 1)
    assert min(mpimg.imread(path).shape[:2]) >= 256
