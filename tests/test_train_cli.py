"""`avel-train` end to end on a tiny store: outputs of a run, seeds summary, checkpoints, errors."""
from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pytest
import torch
import yaml
import zarr
from click.testing import CliRunner

from extract.core.settings import load_pipeline
from train.checkpoint import CheckpointError, build_head, load_checkpoint, save_checkpoint
from train.cli import main
from train.data import load_from_pipeline
from train.evaluate import evaluate_split
from train.loop import TEST_SELECTION_LABEL
from train.protocol import Protocol
from train.runs import parse_seeds, read_epochs_csv
from train_testutils import TEST_HEAD, make_dataset, registered_test_head

torch.set_num_threads(1)
RUN_FILES = {"config.yaml", "metrics.json", "epochs.csv", "checkpoint.safetensors",
             "learning_curves.png", "confusion_test.png", "timeline_test.png"}


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("cli"), T=10, sizes=(12, 6, 6))


@pytest.fixture(autouse=True)
def linear_head():
    with registered_test_head() as cls:
        yield cls


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def run_dirs(ds, setting="supervised"):
    group = ds["pipeline"].parent / "runs" / f"avel-{TEST_HEAD}-{setting}"
    return sorted(p for p in group.glob("seed*") if p.is_dir()) if group.exists() else []


def test_parse_seeds():
    assert parse_seeds("0,1,2") == [0, 1, 2]
    assert parse_seeds("0-4") == [0, 1, 2, 3, 4]
    assert parse_seeds("3, 0-1,3") == [3, 0, 1]
    for bad in ("", "a", "4-2"):
        with pytest.raises(ValueError):
            parse_seeds(bad)


def test_list_heads_and_print_config(ds):
    res = invoke("--list-heads")
    assert res.exit_code == 0 and TEST_HEAD in res.output
    res = invoke("--config", ds["pipeline"], "--head", TEST_HEAD, "--epochs", 2, "--lr", 0.01, "--seeds", "0-2", "--print-config")
    assert res.exit_code == 0
    resolved = yaml.safe_load(res.output.split("\n", 1)[1])
    assert resolved["train"]["epochs"] == 2 and resolved["train"]["lr"] == 0.01
    assert resolved["train"]["seeds"] == [0, 1, 2] and resolved["train"]["head"] == TEST_HEAD
    assert not run_dirs(ds)


def test_unknown_head_is_a_usage_error(ds):
    res = invoke("--config", ds["pipeline"], "--head", "no-such-head")
    assert res.exit_code == 2 and "no-such-head" in res.output


def test_two_seeds_write_runs_summary_and_loadable_checkpoints(ds):
    res = invoke("--config", ds["pipeline"], "--head", TEST_HEAD, "--epochs", 3, "--seeds", "0,1")
    assert res.exit_code == 0, res.output
    dirs = run_dirs(ds)
    assert [d.name.split("-")[0] for d in dirs] == ["seed0", "seed1"]
    tests = []
    for d in dirs:
        assert RUN_FILES <= {p.name for p in d.iterdir()}
        m = json.loads((d / "metrics.json").read_text())
        assert m["head"] == TEST_HEAD and m["selection"] == "val" and m["setting"] == "supervised"
        assert m["param_count"] == 4 * (128 + 512) + 4 and m["store_fingerprint"] == "test"
        assert m["test"]["segments"] == 60 and set(m["test"]["per_class_accuracy"]) == {"dog", "car", "bell", "background"}
        rows = read_epochs_csv(d / "epochs.csv")
        assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
        # metrics' val accuracy = the selected epoch's val accuracy in epochs.csv
        assert float(rows[m["selected_epoch"] - 1]["val_accuracy"]) == pytest.approx(m["val_accuracy"], abs=1e-5)
        assert yaml.safe_load((d / "config.yaml").read_text().split("\n", 1)[1])["train"]["epochs"] == 3
        # the checkpoint rebuilds the head without unpickling and reproduces the test accuracy
        head, meta = build_head(d / "checkpoint.safetensors")
        assert meta["head"] == TEST_HEAD and meta["pipeline"]["train"]["epochs"] == 3 and meta["seed"] == m["seed"]
        data = load_from_pipeline(load_pipeline(ds["pipeline"]), ["test"])
        assert evaluate_split(head, data.bank, data.splits["test"], 4).accuracy == pytest.approx(m["test_accuracy"])
        tests.append(m["test_accuracy"])
    summary = json.loads((dirs[0].parent / "summary.json").read_text())
    assert summary["test_accuracy"]["mean"] == pytest.approx(np.mean(tests))
    assert summary["test_accuracy"]["std"] == pytest.approx(np.std(tests, ddof=1))
    assert f"test accuracy: {np.mean(tests):.4f} ± {np.std(tests, ddof=1):.4f} (2 seeds)" in res.output
    assert "mean ± std" in (dirs[0].parent / "summary.md").read_text()


def test_select_on_test_is_labelled(ds):
    res = invoke("--config", ds["pipeline"], "--head", TEST_HEAD, "--epochs", 1, "--select-on", "test", "--setting", "weak")
    assert res.exit_code == 0, res.output
    (d,) = run_dirs(ds, "weak")
    m = json.loads((d / "metrics.json").read_text())
    assert m["selection"] == TEST_SELECTION_LABEL and m["weak_pool"] == "mean"
    assert TEST_SELECTION_LABEL in res.output
    assert f"test accuracy: {m['test_accuracy']:.4f}" in res.output.splitlines()[-1]


def test_reference_protocol_runs_are_labelled(ds, linear_head):
    """--protocol reference: the head's recorded protocol decides order, cadence and selection, and
    every output says so (run folder, metrics.json, epochs.csv, the printed table, checkpoint)."""
    linear_head.reference_protocols = {"supervised": Protocol(
        "reference", script="example/repo train.py", shuffle=False, drop_last=True, select_on="val",
        eval_first=1, eval_every=2, eval_last=False)}
    res = invoke("--config", ds["pipeline"], "--head", TEST_HEAD, "--epochs", 4, "--protocol", "reference")
    assert res.exit_code == 0, res.output
    assert "protocol: reference" in res.output  # the printed resolved config
    group = ds["pipeline"].parent / "runs" / f"avel-{TEST_HEAD}-supervised-reference"
    (d,) = sorted(group.glob("seed*"))
    m = json.loads((d / "metrics.json").read_text())
    assert m["protocol"]["name"] == "reference" and m["protocol"]["label"] == "reference protocol (example/repo train.py)"
    assert (m["protocol"]["shuffle"], m["protocol"]["drop_last"]) == (False, True)
    rows = read_epochs_csv(d / "epochs.csv")
    assert [r["epoch"] for r in rows if r["val_accuracy"]] == ["1", "3"]  # epochs 1, 3; not the last (4)
    assert "trained with the reference protocol (example/repo train.py): one fixed order, last partial batch " \
           "dropped, val evaluated every 2 epochs from epoch 1" in res.output
    _, meta = load_checkpoint(d / "checkpoint.safetensors")
    assert meta["protocol"] == "reference protocol (example/repo train.py)"
    assert yaml.safe_load((d / "config.yaml").read_text())["train"]["protocol"] == "reference"
    # a head without a recorded protocol: one line, exit 2, no run folder
    linear_head.reference_protocols = {}
    res = invoke("--config", ds["pipeline"], "--head", TEST_HEAD, "--epochs", 1, "--protocol", "reference")
    assert res.exit_code == 2 and "no recorded reference training protocol" in res.output
    assert sorted(group.glob("seed*")) == [d]


def test_bad_store_fails_before_training(ds, tmp_path):
    bad = tmp_path / "bad.zarr"
    shutil.copytree(ds["store"], bad)
    zarr.open_group(str(bad), mode="r+").attrs["schema_version"] = 7
    before = run_dirs(ds)
    res = invoke("--config", ds["pipeline"], "--head", TEST_HEAD, "--store", bad)
    assert res.exit_code == 2  # a user error: one line, exit 2
    assert str(bad) in res.output and "schema version 7" in res.output
    assert run_dirs(ds) == before  # no run directory was made


def test_checkpoints_are_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(pickle.dumps({"w": Evil()}))
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(evil)
    assert not marker.exists()
    plain = save_checkpoint(tmp_path / "plain.safetensors", {"w": torch.ones(2)}, {"head": "x"})
    state, meta = load_checkpoint(plain)
    assert torch.equal(state["w"], torch.ones(2)) and meta["head"] == "x" and meta["format"] == "avel-checkpoint"
    from safetensors.torch import save_file

    save_file({"w": torch.ones(1)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(CheckpointError, match="not written by avel-train"):
        load_checkpoint(tmp_path / "foreign.safetensors")


def test_bench_subcommand_on_a_tiny_store(tmp_path):
    import h5py

    out = tmp_path / "bench.json"
    res = invoke("bench", "--workdir", tmp_path / "b", "--rows", 20, "--head", TEST_HEAD, "--batch-size", 4,
                 "--schedule-epochs", 10, "--device", "cpu", "--json-out", out)
    assert res.exit_code == 0, res.output
    r = json.loads(out.read_text())
    assert "speed-up" in res.output and r["head"] == TEST_HEAD and r["train_samples"] == 16
    ours, ref = r["this_trainer"], r["reference_loop"]
    assert ours["schedule_s"] == pytest.approx(ours["load_s"] + 10 * (ours["epoch_s"] + ours["eval_s"]))
    assert ref["schedule_s"] == pytest.approx(ref["load_s"] + 10 * ref["epoch_s"] + 2 * ref["eval_s"])
    assert r["epoch_speedup"] == pytest.approx(ref["epoch_s"] / ours["epoch_s"])
    assert r["data_speedup"] == pytest.approx(ref["data_epoch_s"] / ours["data_epoch_s"])
    # both trainers read the same numbers: the h5 copy is the store's float16 values as float32
    from extract.core.store import open_store

    store = open_store(tmp_path / "b" / "ave-synthetic-20.zarr")
    with h5py.File(tmp_path / "b" / "visual_feature.h5", "r") as f:
        np.testing.assert_array_equal(f["avadataset"][:3], store.read("visual", slice(0, 3)).astype(np.float32))
    with h5py.File(tmp_path / "b" / "labels.h5", "r") as f:
        one_hot = f["avadataset"][:]
    from extract.core.manifest import read_manifest

    train = read_manifest(tmp_path / "b" / "manifests" / "train.csv")
    np.testing.assert_array_equal(one_hot[:16].argmax(-1), train.segment_labels(10))
