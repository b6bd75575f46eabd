"""train.headtable: the synthetic AVE-like store (labels, background-only videos, prototypes in
the features) and the combined head table."""
from __future__ import annotations

import numpy as np
import pytest

from extract.core.manifest import read_manifest
from train import headtable


@pytest.fixture()
def small_synthetic(tmp_path, monkeypatch):
    monkeypatch.setattr(headtable, "SYN_SPLITS", {"train": 8, "val": 3, "test": 3})
    monkeypatch.setattr(headtable, "SYN_BACKGROUND_TRAIN", 3)
    return headtable.make_synthetic(tmp_path / "syn", noise=0.05, rows_per_shard=4)


def test_synthetic_store_labels_and_features(small_synthetic):
    import zarr

    folder = small_synthetic.parent
    train = read_manifest(folder / "manifests" / "train.csv")
    assert len(train.samples) == 8 + 3
    background = [s for s in train.samples if not s.category]
    assert [s.sample_id for s in background] == [s.sample_id for s in train.samples[-3:]]
    assert all(s.onset == s.offset == 0 for s in background)
    assert len(read_manifest(folder / "manifests" / "test.csv").samples) == 3
    group = zarr.open_group(str(folder / "store.zarr"), mode="r")
    ids = [str(x) for x in np.asarray(group["ids"][:])]
    audio = np.asarray(group["audio"][:], dtype=np.float32)
    visual = np.asarray(group["visual"][:], dtype=np.float32)
    assert audio.shape == (17, 10, 128) and visual.shape == (17, 10, 7, 7, 512)
    labels = train.segment_labels(10)
    for sample, row_labels in zip(train.samples, labels):
        i = ids.index(sample.sample_id)
        event = row_labels < 28
        assert event.sum() == sample.offset - sample.onset
        norms = np.linalg.norm(audio[i], axis=1)
        # event segments carry the class prototype (|p| ~ 1.5 sqrt(128)), the rest noise or a
        # one-modality prototype; all event segments of a video share the same prototype
        if event.any():
            assert norms[event].min() > 5.0
            e = audio[i][event]
            cos = (e @ e.T) / np.outer(np.linalg.norm(e, axis=1), np.linalg.norm(e, axis=1))
            assert cos.min() > 0.99
            patch = visual[i][event].max(axis=-1)  # [n, 7, 7]: the prototype sits on one 3x3 patch
            assert ((patch > 1.0).sum(axis=(1, 2)) == 9).all()
        quiet = ~event & (norms < 5.0)
        assert np.all(norms[quiet] < 1.5)


def test_combined_markdown_marks_misses_and_failures():
    demo = [
        {"head": "a", "setting": "supervised", "test_accuracy": "0.5", "test_majority_baseline": "0.5", "beats_baseline": "NO", "error": ""},
        {"head": "dmrn", "setting": "supervised", "test_accuracy": "0.9123", "test_majority_baseline": "0.5", "beats_baseline": "yes", "error": ""},
    ]
    syn = [{"head": "dmrn", "setting": "weak", "test_accuracy": "", "test_majority_baseline": "0.4", "beats_baseline": "", "error": "boom"}]
    text = headtable.combined_markdown([("demo", demo), ("synthetic", syn)], {"dmrn": 1571150, "a": 282525})
    lines = text.splitlines()
    assert lines[0] == "| head | parameters (C = 29) | demo supervised (majority 0.500) | synthetic weak (majority 0.400) |"
    assert lines[2] == "| `dmrn` | 1,571,150 | 0.912 | failed |"  # the papers' heads first
    assert lines[3] == "| `a` | 282,525 | 0.500 (NO) | - |"


def test_parameter_counts_for_ave():
    from test_avel_parity import ATT_NET_PARAMS, TBMRF_PARAMS  # counted from the reference's layer sizes

    counts = headtable.ave_parameter_counts(["dmrn", "a+v-att"])
    assert counts == {"dmrn": TBMRF_PARAMS, "a+v-att": ATT_NET_PARAMS}


def test_disable_plots_replaces_the_avel_tasks_png_writer(monkeypatch):
    from train import headtable
    from train.tasks import avel_task

    monkeypatch.setattr(avel_task, "write_plots", avel_task.write_plots)  # restored after the test
    headtable.disable_plots()
    assert avel_task.write_plots(None, "", None, None, None) is None and avel_task.write_plots.__name__ == "<lambda>"
