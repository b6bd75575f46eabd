"""Training sweeps (train.sweep): heads x seeds fanned out as Dask tasks give the same numbers as
the runs one by one, and the results table holds mean ± std per head and setting (CSV, Markdown)."""
from __future__ import annotations

import csv
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from extract.core.settings import load_pipeline
from train_testutils import TEST_HEAD, make_dataset, registered_test_head

torch.set_num_threads(1)
HEADS = [TEST_HEAD, "a"]  # the tests' linear head and the audio-only BiLSTM of Tian et al.


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("sweep"), T=10, sizes=(12, 6, 6))


@pytest.fixture(autouse=True)
def linear_head(monkeypatch):
    from train.tasks.avel_task import AvelTask

    # the PNG plots of a run take ~95 % of a tiny run's time and are tested elsewhere
    monkeypatch.setattr(AvelTask, "write_outputs", lambda *args, **kwargs: None)
    with registered_test_head() as cls:
        yield cls


def pipeline_of(ds, **train):
    return load_pipeline(ds["pipeline"], {"train": {"epochs": 2, "device": "cpu", "batch_size": 4, **train}})


def test_expand_and_parse():
    from train.sweep import RunSpec, expand_runs, parse_list

    assert parse_list(" dmrn, bmfn,,dmrn ") == ["dmrn", "bmfn"]
    assert expand_runs(["x", "y"], ["supervised", "weak"], [0, 1]) == [
        RunSpec("x", "supervised", 0), RunSpec("x", "supervised", 1), RunSpec("x", "weak", 0), RunSpec("x", "weak", 1),
        RunSpec("y", "supervised", 0), RunSpec("y", "supervised", 1), RunSpec("y", "weak", 0), RunSpec("y", "weak", 1)]


def test_dask_sweep_equals_sequential_runs_and_tables_hold_mean_std(ds, tmp_path):
    from distributed import Client, LocalCluster

    from train.sweep import expand_runs, run_sweep, sweep_markdown, sweep_table, write_sweep

    pipeline = pipeline_of(ds)
    specs = expand_runs(HEADS, ["supervised"], [0, 1])
    assert pickle.loads(pickle.dumps(pipeline.to_dict())) == pipeline.to_dict()  # what travels to workers

    sequential = run_sweep(pipeline, specs)
    # one worker thread in this process (the test head is registered here only)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address="127.0.0.1:0") as cluster, \
            Client(cluster) as client:
        fanned = run_sweep(pipeline, specs, client=client)
    assert [(r["head"], r["setting"], r["seed"]) for r in fanned] == [(s.head, s.setting, s.seed) for s in specs]
    assert all(not r["error"] for r in fanned + sequential)
    for a, b in zip(sequential, fanned):
        assert a["run_dir"] != b["run_dir"]
        assert (a["val_accuracy"], a["test_accuracy"], a["selected_epoch"]) == (
            b["val_accuracy"], b["test_accuracy"], b["selected_epoch"])

    # every run wrote its own run directory; the table is computed from those metrics
    metrics = [json.loads((Path(r["run_dir"]) / "metrics.json").read_text()) for r in fanned]
    assert [(m["head"], m["seed"], m["epochs"]) for m in metrics] == [(s.head, s.seed, 2) for s in specs]
    table = sweep_table(fanned)
    assert [(t["head"], t["setting"], t["runs"], t["failed"], t["seeds"]) for t in table] == [
        (TEST_HEAD, "supervised", 2, 0, "0 1"), ("a", "supervised", 2, 0, "0 1")]
    for entry in table:
        for key in ("val_accuracy", "test_accuracy"):
            values = [m[key] for m in metrics if m["head"] == entry["head"]]
            assert entry[f"{key}_mean"] == pytest.approx(np.mean(values), abs=1e-12)
            assert entry[f"{key}_std"] == pytest.approx(np.std(values, ddof=1), abs=1e-12)

    paths = write_sweep(tmp_path / "runs", "avel", fanned)
    with paths["results"].open() as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["head"], r["runs"]) for r in rows] == [(TEST_HEAD, "2"), ("a", "2")]
    assert float(rows[1]["test_accuracy_mean"]) == pytest.approx(table[1]["test_accuracy_mean"], rel=1e-5)
    with paths["runs"].open() as fh:
        assert len(list(csv.DictReader(fh))) == 4
    md = paths["markdown"].read_text()
    t = table[1]
    # each accuracy sits beside its baseline: the majority-class share of the split, counted here by hand
    majority = {split: majority_share(ds["samples"][split], 10) for split in ("val", "test")}
    assert t["test_accuracy_baseline"] == pytest.approx(majority["test"])
    assert t["val_accuracy_baseline"] == pytest.approx(majority["val"])
    assert float(rows[1]["test_accuracy_baseline"]) == pytest.approx(majority["test"], rel=1e-5)
    assert (f"| a | supervised | 2 | {t['val_accuracy_mean']:.4f} ± {t['val_accuracy_std']:.4f} | {majority['val']:.4f} | "
            f"{t['test_accuracy_mean']:.4f} ± {t['test_accuracy_std']:.4f} | {majority['test']:.4f} |") in md
    assert "| test_accuracy | test_accuracy baseline |" in md
    assert md == sweep_markdown(table, "avel")


def majority_share(samples, T: int) -> float:
    """Share of the most frequent segment label of ``samples``: event seconds per class and the
    background seconds, counted from onset/offset."""
    counts: dict[str, int] = {}
    for s in samples:
        event = max(0, min(T, s.offset) - max(0, s.onset)) if s.category else 0
        counts[s.category] = counts.get(s.category, 0) + event
        counts["background"] = counts.get("background", 0) + T - event
    return max(counts.values()) / (T * len(samples))


def test_a_failed_run_is_listed_and_left_out_of_the_means(ds, monkeypatch):
    import train.sweep as sweep

    real = sweep.run_one

    def flaky(state, base_dir, source, spec):
        if spec.seed == 1:
            raise RuntimeError("out of memory")
        return real(state, base_dir, source, spec)

    monkeypatch.setattr(sweep, "run_one", flaky)
    rows = sweep.run_sweep(pipeline_of(ds), sweep.expand_runs([TEST_HEAD], ["supervised"], [0, 1]))
    assert rows[1]["error"] == "RuntimeError: out of memory" and rows[1]["test_accuracy"] is None
    (entry,) = sweep.sweep_table(rows)
    assert (entry["runs"], entry["failed"], entry["test_accuracy_mean"], entry["test_accuracy_std"]) == (
        1, 1, rows[0]["test_accuracy"], 0.0)
    with pytest.raises(ValueError, match="supports --setting"):
        sweep.run_sweep(pipeline_of(ds), [sweep.RunSpec("a", "bogus", 0)])


def test_cli_fans_out_comma_lists(ds):
    from train.cli import main

    res = CliRunner().invoke(main, ["--config", str(ds["pipeline"]), "--head", f"{TEST_HEAD},a", "--seeds", "0",
                                    "--setting", "supervised,weak", "--epochs", "1", "--device", "cpu"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    sweeps = sorted((ds["pipeline"].parent / "runs").glob("sweep-avel-*"))
    assert sweeps
    with (sweeps[-1] / "results.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["head"], r["setting"], r["runs"]) for r in rows] == [
        (TEST_HEAD, "supervised", "1"), (TEST_HEAD, "weak", "1"), ("a", "supervised", "1"), ("a", "weak", "1")]
    assert "| a | weak | 1 |" in res.output
