"""Segment accuracy, per-class accuracy and confusion matrix against hand-computed cases."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from train.data import FeatureBank, SplitData
from train.evaluate import confusion_matrix, evaluate_split, per_class_accuracy, score_predictions, segment_accuracy
from train.heads.base import HeadOutput

torch.set_num_threads(1)


def test_hand_computed_case():
    labels = np.array([[0, 0, 2, 2], [1, 1, 2, 2]])
    preds = np.array([[0, 1, 2, 2], [1, 1, 0, 2]])
    # correct: (0,0) (0,2) (0,3) (1,0) (1,1) (1,3) = 6 of 8
    assert segment_accuracy(preds, labels) == pytest.approx(0.75)
    cm = confusion_matrix(preds, labels, 4)
    expected = np.array([[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 3, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(cm, expected)
    per = per_class_accuracy(cm)
    np.testing.assert_allclose(per[:3], [0.5, 1.0, 0.75])
    assert np.isnan(per[3])  # class without segments
    res = score_predictions(preds, labels, 4)
    assert (res.correct, res.total) == (6, 8)
    js = res.to_json(["a", "b", "c", "bg"])
    assert js["per_class_accuracy"] == {"a": 0.5, "b": 1.0, "c": 0.75, "bg": None}
    assert js["per_class_segments"] == {"a": 2, "b": 2, "c": 4, "bg": 0}


def test_ave_sized_split_counts_every_segment_background_included():
    # 402 test samples x 10 segments: background (28) is a class like any other
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 29, size=(402, 10))
    preds = labels.copy()
    wrong = [(0, 0), (5, 3), (401, 9)]
    for i, t in wrong:
        preds[i, t] = (labels[i, t] + 1) % 29
    res = score_predictions(preds, labels, 29)
    assert res.total == 4020
    assert res.correct == 4017
    assert res.accuracy == pytest.approx(4017 / 4020)
    assert res.confusion.sum() == 4020
    # a prediction of background where background is true counts as correct
    bg = np.full((2, 10), 28)
    assert segment_accuracy(bg, bg) == 1.0


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differ"):
        segment_accuracy(np.zeros((2, 10)), np.zeros((2, 9)))


class _AudioArgmax(torch.nn.Module):
    """Predicts the class = argmax of the first C audio dims; loss = 0."""

    def __init__(self, c):
        super().__init__()
        self.c = c

    def forward(self, audio, visual):
        return HeadOutput(audio[..., : self.c])

    def loss(self, out, batch, weak_pool="mean"):
        return torch.zeros(())

    def predict(self, out):
        return out.scores.argmax(-1)


def test_evaluate_split_matches_numpy_reference():
    rng = np.random.default_rng(1)
    R, N, T, C = 5, 7, 4, 3
    audio = rng.normal(size=(R, T, 128)).astype(np.float32)
    bank = FeatureBank(torch.from_numpy(audio), torch.zeros(R, T, 7, 7, 512, dtype=torch.float16),
                       torch.ones(R, T, dtype=torch.bool), [str(i) for i in range(R)], None, "", {})
    rows = rng.integers(0, R, size=N)  # several samples share a row
    labels = rng.integers(0, C, size=(N, T))
    split = SplitData("test", None, [f"s{i}" for i in range(N)], torch.from_numpy(rows), torch.from_numpy(labels),
                      torch.zeros(N, dtype=torch.long), torch.ones(N, T, dtype=torch.bool))
    res = evaluate_split(_AudioArgmax(C), bank, split, C, batch_size=3)
    expected_pred = audio[rows, :, :C].argmax(-1)
    np.testing.assert_array_equal(res.predictions, expected_pred)
    assert res.accuracy == pytest.approx((expected_pred == labels).mean())
    assert res.total == N * T


def test_timeline_samples_prefer_videos_with_event_and_background(tmp_path):
    from train.plots import choose_timeline_samples, plot_timelines

    bg = 3
    labels = np.array([[bg] * 4, [0, 0, bg, bg], [1] * 4, [bg, 2, 2, bg], [bg, bg, bg, 1]])
    mixed = {1, 3, 4}
    two = choose_timeline_samples(labels, bg, 2, seed=0)
    assert len(two) == 2 and set(two) <= mixed
    assert two == choose_timeline_samples(labels, bg, 2, seed=0)  # reproducible
    four = choose_timeline_samples(labels, bg, 4, seed=0)
    assert mixed <= set(four) and len(set(four)) == 4
    assert choose_timeline_samples(labels, bg, 9) == [0, 1, 2, 3, 4]
    png = plot_timelines(labels, labels, [f"v{i}" for i in range(5)], ["a", "b", "c", "bg"], tmp_path / "t.png", two)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
