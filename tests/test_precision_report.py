"""train.precision_report (issue 27): the deviation of a low-precision store from an fp32 one per
array, and the label agreement of a head trained on the fp32 one."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from train.precision_report import label_agreement, store_deviation
from train_testutils import TEST_HEAD, make_dataset, registered_test_head, write_store

torch.set_num_threads(1)
T = 10


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("precision"), T=T, sizes=(12, 6, 6))


def test_deviation_per_array_over_the_segments_valid_in_both(ds, tmp_path):
    rng = np.random.default_rng(0)
    audio = ds["audio"].copy()
    noise = rng.standard_normal(audio.shape).astype(np.float32) * 0.01 * np.abs(audio).mean()
    valid = np.ones((len(ds["ids"]), T), bool)
    valid[0, :4] = False  # invalid in the low store only: not compared
    low_audio = audio + noise
    low_audio[0, :4] = 1e6  # garbage where invalid
    write_store(tmp_path / "low.zarr", ds["ids"], ds["visual"], low_audio, valid, T)
    report = store_deviation(ds["store"], tmp_path / "low.zarr")
    assert set(report) == {"audio", "visual"}
    assert report["visual"]["relative_l2"] == 0.0 and report["visual"]["segments"] == valid.sum()
    keep = valid
    expected = np.linalg.norm((low_audio - audio)[keep].astype(np.float64)) / np.linalg.norm(audio[keep].astype(np.float64))
    assert report["audio"]["relative_l2"] == pytest.approx(expected, rel=1e-6)
    per_row = [np.linalg.norm((low_audio[i] - audio[i])[keep[i]].astype(np.float64)) / np.linalg.norm(audio[i][keep[i]].astype(np.float64))
               for i in range(len(audio))]
    assert report["audio"]["row_max"] == pytest.approx(max(per_row), rel=1e-6)
    assert report["audio"]["rows"] == len(audio)


def test_label_agreement_of_a_head_trained_on_the_fp32_store(ds, tmp_path):
    with registered_test_head():
        same = label_agreement(ds["pipeline"], ds["store"], ds["store"], head=TEST_HEAD)
        assert same["label_agreement"] == 1.0 and same["test_seconds"] == 6 * T
        assert same["test_accuracy_fp32_features"] == same["test_accuracy_low_features"]
        # features with their event prototypes removed: other labels, counted second by second
        flat = ds["visual"].copy()
        flat[:] = flat.mean(axis=(0, 1), keepdims=True)
        audio = np.zeros_like(ds["audio"])
        write_store(tmp_path / "flat.zarr", ds["ids"], flat, audio, np.ones((len(ds["ids"]), T), bool), T)
        other = label_agreement(ds["pipeline"], ds["store"], tmp_path / "flat.zarr", head=TEST_HEAD)
    assert other["test_accuracy_fp32_features"] == same["test_accuracy_fp32_features"]  # same training, same seed
    assert other["label_agreement"] < 1.0
    assert other["differing_seconds"] == round((1 - other["label_agreement"]) * 6 * T)
