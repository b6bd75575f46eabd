"""Segment-level evaluation of event localization.

Accuracy = correct segments / all segments of the split, background counted as a class (AVE test:
402 samples x 10 segments = 4020). This is the metric of Tian et al. (2018) and of the reference
code (``compute_acc``: argmax per segment over all 402 x 10 segments).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from .data import FeatureBank, SplitData, iterate_batches
from .heads.base import total_loss


@dataclasses.dataclass
class EvalResult:
    """Metrics of one split. ``confusion[i, j]`` counts segments of true class i predicted as j."""

    accuracy: float
    correct: int
    total: int
    per_class: np.ndarray  # [C] float, nan where a class has no segment
    support: np.ndarray  # [C] int, segments per true class
    confusion: np.ndarray  # [C, C] int64
    predictions: np.ndarray  # [N, T] int64
    loss: float | None = None

    def to_json(self, class_names: list[str] | None = None) -> dict[str, Any]:
        names = class_names or [str(i) for i in range(len(self.per_class))]
        return {
            "accuracy": self.accuracy,
            "correct": self.correct,
            "segments": self.total,
            "loss": self.loss,
            "per_class_accuracy": {
                name: (None if np.isnan(acc) else float(acc)) for name, acc in zip(names, self.per_class)
            },
            "per_class_segments": {name: int(n) for name, n in zip(names, self.support)},
        }


def confusion_matrix(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """[C, C] counts over all segments: rows = true class, columns = predicted class."""
    pred = np.asarray(pred, dtype=np.int64).ravel()
    labels = np.asarray(labels, dtype=np.int64).ravel()
    if pred.shape != labels.shape:
        raise ValueError(f"predictions {pred.shape} and labels {labels.shape} differ in size")
    flat = labels * num_classes + pred
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def segment_accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    """Correct segments / all segments. pred, labels [N, T]."""
    pred, labels = np.asarray(pred), np.asarray(labels)
    if pred.shape != labels.shape:
        raise ValueError(f"predictions {pred.shape} and labels {labels.shape} differ in shape")
    if labels.size == 0:
        raise ValueError("cannot compute accuracy over zero segments")
    return float((pred == labels).sum() / labels.size)


def per_class_accuracy(confusion: np.ndarray) -> np.ndarray:
    """Recall per true class from a confusion matrix: diag / row sums (nan for empty rows)."""
    support = confusion.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(confusion) / np.maximum(support, 1), np.nan)


def score_predictions(pred: np.ndarray, labels: np.ndarray, num_classes: int, loss: float | None = None) -> EvalResult:
    """All metrics of predictions [N, T] against labels [N, T]."""
    pred = np.asarray(pred, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    cm = confusion_matrix(pred, labels, num_classes)
    return EvalResult(
        accuracy=segment_accuracy(pred, labels),
        correct=int(np.trace(cm)),
        total=int(labels.size),
        per_class=per_class_accuracy(cm),
        support=cm.sum(axis=1),
        confusion=cm,
        predictions=pred,
        loss=loss,
    )


@torch.no_grad()
def predict_split(model, bank: FeatureBank, split: SplitData, batch_size: int = 256, weak_pool: str = "mean") -> tuple[np.ndarray, float]:
    """Run ``model`` (eval mode) over a split: predictions [N, T] and the mean batch loss
    (the head's training loss for its setting, weighted by batch size).

    One pass on the bank's device: predictions and the loss sum stay there until the split is
    done, then come back in one transfer each."""
    was_training = model.training
    model.eval()
    preds, loss_sum = [], torch.zeros((), dtype=torch.float64, device=bank.device)
    try:
        for batch in iterate_batches(bank, split, batch_size):
            out = model(batch["audio"], batch["visual"])
            loss_sum += total_loss(model.loss(out, batch, weak_pool)).double() * len(batch["index"])
            preds.append(model.predict(out))
    finally:
        model.train(was_training)
    pred = torch.cat(preds).cpu().numpy() if preds else np.zeros((0, bank.segments), np.int64)
    return pred, float(loss_sum) / max(len(split), 1)


def evaluate_split(model, bank: FeatureBank, split: SplitData, num_classes: int, batch_size: int = 256, weak_pool: str = "mean") -> EvalResult:
    """Predict and score one split."""
    pred, loss = predict_split(model, bank, split, batch_size, weak_pool)
    return score_predictions(pred, split.labels.cpu().numpy(), num_classes, loss)
