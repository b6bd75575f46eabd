"""The cml task end to end on a synthetic store where matched audio/visual pairs share a latent
signal: every model beats the chance level clearly; the run directory, the checkpoint, the
predictions and the CLI (`avel-train --task cml`) agree with each other."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from extract.core.manifest import Sample, write_manifest
from extract.core.settings import load_pipeline
from train import runner
from train.registry import get_head
from train_testutils import write_store

torch.set_num_threads(1)

T = 10
LATENT = 8
SIZES = {"train": 96, "val": 24, "test": 32}
#: small co-attention sizes keep the CPU test fast (the paper sizes are tested in test_cml.py)
SMALL_COATTENTION = {"attention": {"fc12_hidden": 32, "fc4_hidden": 32, "lstm_hidden": 16}, "match_hidden": 32}
#: epochs per head in these tests (the heads' paper schedules are far longer)
EPOCHS = {"avdln": 2, "dcca": 8, "coattention-cml": 8}


def latent_features(spans: list[tuple[int, int]], rng: np.random.Generator):
    """Per video a random latent z [LATENT]; inside the event audio = A z + noise and every
    visual position = V z + noise (A, V fixed random projections); outside, independent noise.
    Returns (visual [N, T, 7, 7, 512] f16, audio [N, T, 128] f32)."""
    n = len(spans)
    proj_a = rng.normal(0, 1, (LATENT, 128)) / np.sqrt(LATENT)
    proj_v = rng.normal(0, 1, (LATENT, 512)) / np.sqrt(LATENT)
    audio = rng.normal(0, 1, (n, T, 128))
    visual = rng.normal(0, 0.3, (n, T, 7, 7, 512)) + rng.normal(0, 1, (n, T, 1, 1, 512))
    for i, (on, off) in enumerate(spans):
        z = rng.normal(0, 1, LATENT)
        audio[i, on:off] = z @ proj_a + 0.3 * rng.normal(0, 1, (off - on, 128))
        visual[i, on:off] = (z @ proj_v)[None, None, None, :] + 0.3 * rng.normal(0, 1, (off - on, 7, 7, 512))
    return visual.astype(np.float16), audio.astype(np.float32)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return build_dataset(tmp_path_factory.mktemp("cml"))


def build_dataset(root: Path) -> dict:
    """Store + manifests + pipeline.yaml; events of length 1..9 (a few cover the whole video)."""
    rng = np.random.default_rng(7)
    samples = {}
    for split, n in SIZES.items():
        rows = []
        for i in range(n):
            length = T if i % 12 == 11 else int(rng.integers(1, T))  # every 12th: whole video
            onset = int(rng.integers(0, T - length + 1))
            rows.append(Sample(f"{split}{i:03d}", f"{split}-v{i:03d}", f"v{i}.mp4", "event", onset, onset + length, split))
        samples[split] = rows
        write_manifest(root / "manifests" / f"{split}.csv", rows, ["event"])
    videos = [s for rows in samples.values() for s in rows]
    visual, audio = latent_features([(s.onset, s.offset) for s in videos], rng)
    write_store(root / "store.zarr", [s.key for s in videos], visual, audio, np.ones((len(videos), T), bool), T)
    config = {
        "data": {"splits": {split: {"manifest": f"manifests/{split}.csv"} for split in SIZES}},
        "store": {"path": "store.zarr"},
        "train": {"runs_root": "runs", "task": "cml", "timeline_videos": 3},
        "heads": {"coattention-cml": SMALL_COATTENTION},
    }
    (root / "pipeline.yaml").write_text(yaml.safe_dump(config))
    return {"root": root, "pipeline": root / "pipeline.yaml", "samples": samples}


def pipeline_for(dataset, head: str, **train):
    return load_pipeline(dataset["pipeline"], {"train": {"head": head, "epochs": EPOCHS[head], "device": "cpu", **train}})


def expected_chance(samples) -> float:
    """By hand: mean of 1 / (T - l + 1) over the events shorter than the video."""
    lengths = [s.offset - s.onset for s in samples if s.offset - s.onset < T]
    return sum(1.0 / (T - l + 1) for l in lengths) / len(lengths)


@pytest.fixture(scope="module")
def runs(dataset):
    """One seed of every CML head (trained once for the whole module)."""
    out = {}
    for head in ("avdln", "dcca", "coattention-cml"):
        run_dir = dataset["root"] / "runs" / head
        metrics = runner.run(pipeline_for(dataset, head), head, 0, run_dir)
        out[head] = (metrics, run_dir)
    return out


@pytest.mark.parametrize("head", ["avdln", "dcca", "coattention-cml"])
def test_each_model_beats_chance_clearly(runs, dataset, head):
    metrics, _ = runs[head]
    chance = expected_chance(dataset["samples"]["test"])
    assert metrics["test_chance_accuracy"] == pytest.approx(chance)
    assert metrics["queries"]["test"] == sum(1 for s in dataset["samples"]["test"] if s.offset - s.onset < T)
    for direction in ("a2v", "v2a"):
        acc = metrics[f"test_{direction}_accuracy"]
        assert acc >= chance + 0.3, f"{head} {direction}: {acc:.3f} vs chance {chance:.3f}"


@pytest.mark.parametrize("head", ["avdln", "dcca", "coattention-cml"])
def test_run_directory_checkpoint_and_predictions_agree(runs, dataset, head):
    metrics, run_dir = runs[head]
    for name in ("config.yaml", "metrics.json", "epochs.csv", "checkpoint.safetensors", "learning_curves.png",
                 "predictions_test.csv", "predictions_val.csv", "distances_test.png"):
        assert (run_dir / name).is_file(), name
    on_disk = json.loads((run_dir / "metrics.json").read_text())
    assert on_disk["test_a2v_accuracy"] == pytest.approx(metrics["test_a2v_accuracy"])
    assert on_disk["test"]["chance_percent"] == pytest.approx(100 * metrics["test_chance_accuracy"])
    # the predictions file reproduces the accuracies, and its starts are the window search's
    with (run_dir / "predictions_test.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    truth = {s.sample_id: s for s in dataset["samples"]["test"]}
    a2v = [int(r["a2v_start"]) == truth[r["sample_id"]].onset for r in rows]
    v2a = [int(r["v2a_start"]) == truth[r["sample_id"]].onset for r in rows]
    assert np.mean(a2v) == pytest.approx(metrics["test_a2v_accuracy"])
    assert np.mean(v2a) == pytest.approx(metrics["test_v2a_accuracy"])
    # the checkpoint rebuilds the head; its distances give the same predictions
    from train.checkpoint import build_head
    from train.tasks.cml_task import evaluate, make_cml_split
    from train.data import load_from_pipeline

    model, meta = build_head(run_dir / "checkpoint.safetensors")
    assert meta["task"] == "cml" and meta["head"] == head
    data = load_from_pipeline(pipeline_for(dataset, head), ["train", "val", "test"])
    split = make_cml_split(data, "test", pooled_visual=not model.uses_spatial)
    res = evaluate(model, split)
    assert res.metrics["a2v_acc"] == pytest.approx(100 * metrics["test_a2v_accuracy"])
    assert [int(r["v2a_start"]) for r in rows] == res.predictions["v2a"].tolist()
    brute = [int(np.argmin([sum(d[q.onset + s, t + s] for s in range(q.length)) for t in range(T - q.length + 1)]))
             for d, q in zip(res.distances, split.queries)]
    assert brute == res.predictions["a2v"].tolist()


def test_epochs_csv_has_val_accuracies_and_selected_epoch_is_best(runs):
    metrics, run_dir = runs["avdln"]
    with (run_dir / "epochs.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == EPOCHS["avdln"]
    mean = [(float(r["val_a2v_accuracy"]) + float(r["val_v2a_accuracy"])) / 2 for r in rows]
    assert metrics["selected_epoch"] == int(np.argmax(mean)) + 1  # first best epoch
    assert metrics["schedule"]["batch_size"] == 8 and metrics["schedule"]["batch_unit"] == "segments"


@pytest.mark.parametrize("head", ["dcca", "coattention-cml"])  # a CCA fitted before evaluation; spatial co-attention
def test_evaluate_command_gives_the_runs_figures_from_any_folder(runs, head, tmp_path, monkeypatch):
    """``avel-train evaluate --run RUN`` from an empty folder: the run's store and splits, its
    task's metric, the saved weights: A2V / V2A / mean / chance equal metrics.json's."""
    from click.testing import CliRunner

    from train.cli import main

    _, run_dir = runs[head]
    written = json.loads((run_dir / "metrics.json").read_text())
    monkeypatch.chdir(tmp_path)
    for split in ("test", "val"):
        res = CliRunner().invoke(main, ["evaluate", "--run", str(run_dir), "--split", split, "--json-out", f"{split}.json"],
                                 catch_exceptions=False)
        assert res.exit_code == 0, res.output
        got = json.loads((tmp_path / f"{split}.json").read_text())["metrics"]
        for key in ("accuracy", "a2v_accuracy", "v2a_accuracy", "chance_accuracy"):
            assert got[f"{split}_{key}"] == written[f"{split}_{key}"], (split, key)
        assert got[split] == written[split]
        assert f"{split} accuracy: {written[f'{split}_accuracy']:.4f}" in res.output.splitlines()


def test_training_pairs_and_queries_of_a_split(dataset):
    from train.data import load_from_pipeline
    from train.tasks.cml_task import make_cml_split

    data = load_from_pipeline(pipeline_for(dataset, "avdln"), ["train", "val", "test"])
    split = make_cml_split(data, "train", pooled_visual=True)
    samples = dataset["samples"]["train"]
    assert split.visual(slice(None)).shape == (len(samples), T, 1, 1, 512)
    for i, s in enumerate(samples):
        expected = np.zeros(T, np.float32)
        expected[s.onset:s.offset] = 1
        np.testing.assert_array_equal(split.match[i].numpy(), expected)
    assert [q.sample_id for q in split.queries] == [s.sample_id for s in samples if s.offset - s.onset < T]
    flat = split.flat_segments()
    assert flat["audio"].shape == (len(samples) * T, 1, 128)
    assert float(flat["match"].sum()) == sum(s.offset - s.onset for s in samples)


def test_coattention_init_from_supervised_checkpoint(tmp_path):
    from train.checkpoint import CheckpointError, save_checkpoint

    sup_cls, cml_cls = get_head("coattention"), get_head("coattention-cml")
    torch.manual_seed(0)
    small = SMALL_COATTENTION["attention"]
    supervised = sup_cls(29, config=sup_cls.make_config(small))
    path = save_checkpoint(tmp_path / "sup.safetensors", supervised.state_dict(), {"head": "coattention", "task": "avel"})
    torch.manual_seed(1)
    head = cml_cls(29, config=cml_cls.make_config(SMALL_COATTENTION))
    before = {k: v.clone() for k, v in head.state_dict().items()}
    loaded = head.init_from_checkpoint(path)
    sup_state, own = supervised.state_dict(), head.state_dict()
    assert loaded and all(k.startswith(("cspa.", "csea.", "stream_cspa.lstm_", "stream_csea.lstm_")) for k in loaded)
    for k in own:
        if k in loaded:
            assert torch.equal(own[k], sup_state[k]), k
        else:
            assert "match_" in k and torch.equal(own[k], before[k]), k  # only the matching MLPs stay
    # every co-attention / BLSTM tensor of the supervised head was taken
    assert set(loaded) == {k for k in sup_state if not k.startswith(("stream_cspa.classifier", "stream_csea.classifier"))}
    other = save_checkpoint(tmp_path / "avdln.safetensors", {"x": torch.zeros(1)}, {"head": "avdln"})
    with pytest.raises(CheckpointError, match="coattention"):
        head.init_from_checkpoint(other)
    big = cml_cls(29)  # paper sizes: shapes do not fit the small checkpoint
    with pytest.raises(CheckpointError, match="shape mismatch"):
        big.init_from_checkpoint(path)


def test_cli_runs_cml_with_two_seeds(dataset):
    from click.testing import CliRunner

    from train.cli import main

    result = CliRunner().invoke(
        main,
        ["--config", str(dataset["pipeline"]), "--task", "cml", "--head", "avdln", "--epochs", "1", "--seeds", "0,1",
         "--device", "cpu"],
    )
    assert result.exit_code == 0, result.output
    assert "test A2V" in result.output and "V2A" in result.output and "chance" in result.output
    # chance by hand: queries are the test events with 0 < l < T; a random start is right with 1 / (T - l + 1)
    lengths = [s.offset - s.onset for s in dataset["samples"]["test"] if 0 < s.offset - s.onset < T]
    chance = float(np.mean([1 / (T - l + 1) for l in lengths]))
    assert f"(chance {100 * chance:.1f} ± 0.0%; exact start match, 2 seeds)" in result.output
    assert f"(2 seeds); baseline {chance:.4f} (chance: mean over the queries of 1 / (T - l + 1))" in result.output
    for run in sorted((dataset["root"] / "runs" / "cml-avdln-supervised").glob("seed*")):
        base = json.loads((run / "metrics.json").read_text())["baseline"]
        for key in ("test_accuracy", "test_a2v_accuracy", "test_v2a_accuracy"):
            assert base[key]["value"] == pytest.approx(chance)
    summary = json.loads((dataset["root"] / "runs" / "cml-avdln-supervised" / "summary.json").read_text())
    assert summary["seeds"] == [0, 1]
    values = summary["test_a2v_accuracy"]["values"]
    assert summary["test_a2v_accuracy"]["mean"] == pytest.approx(np.mean(values))
    assert "test_chance_accuracy" in summary


def test_task_initialises_coattention_from_a_relative_init_from_path(dataset):
    """`--set heads.coattention-cml.init_from=sup.safetensors` (relative to pipeline.yaml's folder):
    with a vanishing learning rate the trained CSPA/CSEA/BLSTM weights stay those of the file."""
    from train.checkpoint import load_checkpoint, save_checkpoint

    sup_cls = get_head("coattention")
    torch.manual_seed(5)
    supervised = sup_cls(2, config=sup_cls.make_config(SMALL_COATTENTION["attention"]))
    save_checkpoint(dataset["root"] / "sup.safetensors", supervised.state_dict(), {"head": "coattention"})
    overrides = {
        "train": {"head": "coattention-cml", "epochs": 1, "lr": 1e-12, "device": "cpu"},
        "heads": {"coattention-cml": {**SMALL_COATTENTION, "init_from": "sup.safetensors"}},
    }
    run_dir = dataset["root"] / "runs" / "init"
    runner.run(load_pipeline(dataset["pipeline"], overrides), "coattention-cml", 0, run_dir)
    state, meta = load_checkpoint(run_dir / "checkpoint.safetensors")
    assert meta["head_config"]["init_from"] == "sup.safetensors"
    sup_state = supervised.state_dict()
    taken = [k for k in state if k.startswith(("cspa.", "csea.", "stream_cspa.lstm_", "stream_csea.lstm_"))]
    assert len(taken) > 10
    for k in taken:
        torch.testing.assert_close(state[k], sup_state[k], rtol=0, atol=1e-8)


def test_queries_of_videos_with_missing_segments_are_skipped_and_their_pairs_masked(tmp_path):
    from train.data import load_task_data
    from train.tasks.cml_task import make_cml_split

    rng = np.random.default_rng(0)
    rows = [Sample(f"s{i}", f"v{i}", "x.mp4", "event", on, off, "test") for i, (on, off) in enumerate([(1, 4), (2, 5), (0, 3)])]
    # a second event in video v0 (another manifest row of the same video): pair labels are the union
    rows.append(Sample("s3", "v0", "x.mp4", "event", 6, 8, "test"))
    manifest = write_manifest(tmp_path / "test.csv", rows, ["event"])
    visual, audio = latent_features([(1, 4), (2, 5), (0, 3)], rng)
    valid = np.ones((3, T), bool)
    valid[1, 9] = False  # v1 lacks its last second
    write_store(tmp_path / "s.zarr", ["v0", "v1", "v2"], visual, audio, valid, T)
    data = load_task_data(tmp_path / "s.zarr", {"test": manifest})
    split = make_cml_split(data, "test", pooled_visual=True)
    assert split.keys == ["v0", "v1", "v2"]
    assert [q.sample_id for q in split.queries] == ["s0", "s2", "s3"] and split.skipped_queries == ["s1"]
    assert split.query_video.tolist() == [0, 2, 0]
    np.testing.assert_array_equal(split.match[0].numpy(), [0, 1, 1, 1, 0, 0, 1, 1, 0, 0])
    flat = split.flat_segments()
    assert flat["audio"].shape[0] == 3 * T - 1  # the missing second is no training pair
    # pooled visual = mean over the 7x7 map of the stored (float16) features
    np.testing.assert_allclose(split.visual(slice(None))[2, 0, 0, 0].numpy(),
                               visual[2, 0].astype(np.float32).mean(axis=(0, 1)), rtol=1e-5, atol=1e-5)
