"""Task "avel": audio-visual event localization (Tian et al., ECCV 2018) on a feature store.

A run (:func:`train.runner.run` with ``train.task: avel``) loads the store + splits (once per
process, cached), builds the head, trains it (:func:`train.loop.fit`), and writes the run directory:
config.yaml, metrics.json, epochs.csv, checkpoint.safetensors, learning_curves.png,
confusion_test.png, timeline_test.png. Returns the metrics dict.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data import TaskData, iterate_batches, load_from_pipeline
from ..evaluate import EvalResult, evaluate_split
from ..loop import FitResult
from ..registry import register_task
from ..runs import splits_to_load
from .base import Evaluation, Task, baseline_entry, head_for_task, majority_baseline, store_recipe

log = logging.getLogger(__name__)

#: samples per forward pass when evaluating a split
EVAL_BATCH = 256
#: windows per forward pass (and per read) when predicting new videos
PREDICT_BATCH = 64


@register_task("avel")
class AvelTask(Task):
    """Event localization: every segment classified (events + background), scored by segment
    accuracy. The data is a :class:`train.data.TaskData` (the store's rows in memory)."""

    selection_metric = "segment accuracy (background included)"

    def __init__(self, data: TaskData, train_cfg, pipeline=None):
        super().__init__(train_cfg, data.bank.device, data.splits, data.num_classes, pipeline)
        self.data = data
        #: split name -> its bank rows on the host (to name and check batches without the device)
        self.host_rows = {name: split.rows.cpu().numpy() for name, split in data.splits.items()}

    @classmethod
    def prepare(cls, pipeline, device: torch.device) -> "AvelTask":
        """The store rows of every split in memory (cached across seeds, see
        :func:`train.data.load_from_pipeline`)."""
        return cls(load_from_pipeline(pipeline, splits_to_load(pipeline), device), pipeline.train, pipeline)

    def build_head(self, head_name: str):
        return head_for_task(self.pipeline, head_name, self.name, self.num_classes).to(self.device)

    def train_batches(self, model, batch_size, generator, rng):
        """The batches of one epoch in the order of :attr:`order` (shuffled from ``generator``, or
        the manifest's order; the last partial batch dropped or not)."""
        split = self.splits[self.train_cfg.train_split]
        return iterate_batches(self.data.bank, split, batch_size, shuffle=self.order.shuffle, generator=generator,
                               drop_last=self.order.drop_last)

    def _batch_rows(self, batch) -> np.ndarray:
        """Bank rows of a training batch's samples (``batch["index"]`` = positions in the train
        split, on the host)."""
        return self.host_rows[self.train_cfg.train_split][np.asarray(batch["index"])]

    def batch_videos(self, batch) -> list[str]:
        """Store keys of a training batch's samples."""
        return [self.data.bank.keys[int(r)] for r in self._batch_rows(batch)]

    def batch_finite(self, batch) -> bool:
        """From the bank's row check made when it was loaded (:meth:`train.data.FeatureBank.finite_rows`)."""
        return bool(self.data.bank.finite_rows()[self._batch_rows(batch)].all())

    def batch_accuracy(self, model, out, batch):
        """Hits stay on the device (summed there by the loop)."""
        with torch.no_grad():
            return (model.predict(out) == batch["labels"]).sum(), batch["labels"].numel()

    def evaluate(self, model, split_name: str) -> Evaluation:
        res = evaluate_split(model, self.data.bank, self.splits[split_name], self.num_classes, EVAL_BATCH,
                             self.train_cfg.weak_pool)
        return Evaluation(res.accuracy, {"loss": res.loss, "accuracy": res.accuracy}, res)

    def store_identity(self) -> dict[str, Any]:
        return {"store": str(self.data.bank.store_path), "store_fingerprint": self.data.bank.fingerprint}

    def metrics(self, model, result: FitResult) -> dict[str, Any]:
        """Class list, samples per split, and val/test segment accuracy of the selected weights."""
        cfg, data = self.train_cfg, self.data
        metrics: dict[str, Any] = {
            # the pooling the head's weak loss really applies (heads whose paper fixes it ignore train.weak_pool)
            "weak_pool": model.weak_pooling(cfg.weak_pool) if cfg.setting == "weak" else None,
            "num_classes": data.num_classes,
            "class_names": data.class_names,
            "samples": {name: len(split) for name, split in data.splits.items()},
            "skipped_samples": {name: len(split.skipped) for name, split in data.splits.items()},
            # segments without real features (video shorter than T s); they still count in accuracy
            "invalid_segments": {name: int((~split.valid).sum()) for name, split in data.splits.items()},
        }
        metrics["baseline"] = self.baseline()
        for role in ("val", "test"):
            res: EvalResult | None = result.results.get(role)
            metrics[f"{role}_accuracy"] = None
            if res is not None:
                metrics.update(self.split_metrics(role, res))
        return metrics

    def split_metrics(self, role: str, result: EvalResult) -> dict[str, Any]:
        """``<role>_accuracy`` (segment accuracy, background included) and ``<role>`` (loss,
        per-class accuracy, confusion...: :meth:`train.evaluate.EvalResult.to_json`)."""
        return {f"{role}_accuracy": result.accuracy, role: result.to_json(self.data.class_names)}

    def baseline(self) -> dict[str, Any]:
        """``<role>_accuracy`` of always predicting the split's most frequent segment label
        (background included, every segment counted as in the accuracy)."""
        out: dict[str, Any] = {}
        for role in ("val", "test"):
            name = getattr(self.train_cfg, f"{role}_split")
            if name not in self.data.splits:
                continue
            share, label = majority_baseline(self.data.splits[name].labels.cpu().numpy(), self.data.class_names)
            out[f"{role}_accuracy"] = baseline_entry(share, f"majority class of the {name} split's segments: {label}")
        return out

    def checkpoint_meta(self) -> dict[str, Any]:
        """Class names and how the training store's features were made (``features``), so that
        ``avel-predict`` can compute the same features for new videos (:mod:`train.predict.run`)."""
        return {"class_names": self.data.class_names, "features": store_recipe(self.data.bank.store_path, self.data.bank.fingerprint,
                                                                            self.data.bank.attrs, self.data.bank.segments, self.pipeline)}

    def write_outputs(self, run_dir: Path, title: str, model, result: FitResult) -> None:
        """learning_curves.png, confusion_test.png, timeline_test.png, predictions_test.csv."""
        super().write_outputs(run_dir, title, model, result)
        write_plots(run_dir, title, self.train_cfg, self.data, result)
        test = result.results.get("test")
        if test is not None:
            write_split_predictions(run_dir / "predictions_test.csv", self.data, self.train_cfg.test_split, test.predictions)

    # -- prediction (avel-predict) -----------------------------------------------------------
    @classmethod
    def open_prediction_store(cls, path, segments: int):
        """A complete store with ``audio`` [N, T, 128], ``visual`` [N, T, 7, 7, 512] and ``valid``
        rows of ``segments`` seconds (:func:`train.data.open_checked_store`)."""
        from ..data import open_checked_store

        return open_checked_store(path, segments)

    @classmethod
    def predict_windows(cls, model, store, rows, device="cpu", *, batch: int = PREDICT_BATCH):
        """Each window is one sample of the head, as in training (its temporal context never
        crosses a window edge); ``batch`` windows are read and run at a time, so a long video never
        holds all its features at once (an hour is 360 windows, 360 MB of 7x7x512 maps). Maps:
        the head output's :attr:`~train.heads.base.HeadOutput.spatial` [B, T, h, w], None when the
        head gives none."""
        rows = np.asarray(rows, dtype=np.int64)
        model = model.eval()
        labels, probs, maps = [], [], []
        with torch.no_grad():
            for lo in range(0, len(rows), batch):
                part = rows[lo:lo + batch]
                audio = torch.from_numpy(store.read("audio", part).astype(np.float32)).to(device)
                visual = torch.from_numpy(store.read("visual", part).astype(np.float32)).to(device)
                out = model(audio, visual)
                labels.append(model.predict(out).cpu().numpy())
                probs.append(out.scores.float().softmax(dim=-1).cpu().numpy())
                found = out.spatial
                if found is not None and found.dim() != 4:
                    raise ValueError(f"head {model.name}: HeadOutput.spatial must be [B, T, H, W], got {tuple(found.shape)}")
                maps.append(None if found is None else found.float().cpu().numpy())
        if not labels:
            raise ValueError("predict_windows: no rows")
        spatial_maps = None if any(m is None for m in maps) else np.concatenate(maps)
        return np.concatenate(labels), np.concatenate(probs), spatial_maps


def write_split_predictions(path: Path, data: TaskData, split_name: str, predictions) -> Path:
    """``predictions_test.csv``: one row per video second of the split, columns ``video_id,
    sample_id, second, label, true_label`` (class names); the labels are the selected weights'
    predictions, the same that avel-predict gives for these videos."""
    import csv

    split = data.splits[split_name]
    names = data.class_names
    by_id = {s.sample_id: s for s in split.manifest.samples}
    labels = split.labels.cpu().numpy()
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["video_id", "sample_id", "second", "label", "true_label"])
        for i, sample_id in enumerate(split.sample_ids):
            video_id = by_id[sample_id].video_id
            for t, (pred, true) in enumerate(zip(predictions[i], labels[i])):
                writer.writerow([video_id, sample_id, t, names[int(pred)], names[int(true)]])
    return path


def write_plots(run_dir: Path, title: str, cfg, data: TaskData, result: FitResult) -> None:
    """confusion_test.png and timeline_test.png of the test evaluation."""
    from .. import plots

    test = result.results.get("test")
    if test is None:
        return
    names = data.class_names
    plots.plot_confusion(test.confusion, names, run_dir / "confusion_test.png", f"{title}\ntest accuracy {test.accuracy:.4f}")
    split = data.splits[cfg.test_split]
    labels = split.labels.cpu().numpy()
    chosen = plots.choose_timeline_samples(labels, data.num_classes - 1, cfg.timeline_videos)
    if chosen:
        sample_names = [f"{sid} ({key})" for sid, key in zip(split.sample_ids, _keys(split))]
        plots.plot_timelines(test.predictions, labels, sample_names, names, run_dir / "timeline_test.png", chosen, title)


def _keys(split) -> list[str]:
    by_id = {s.sample_id: s.key for s in split.manifest.samples}
    return [by_id[sid] for sid in split.sample_ids]
