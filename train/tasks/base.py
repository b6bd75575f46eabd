"""What a task is: data, loss and metric, the interface :func:`train.loop.fit` drives.

A task (avel, cml, sol) is a subclass of :class:`Task` registered under its name
(``@register_task("cml")``). An instance holds the data of one run. A run is put together by
:func:`train.runner.run` (threads, device, seeds, the run folder), which calls, in this order::

    task = TaskClass.prepare(pipeline, device)   # data preparation + every check: store, arrays, labels
    model = task.build_head(head_name)           # the registered head with its heads.<name> overrides
    task.attach(model)                           # data that depends on the head (default: nothing)
    result = fit(model, task, schedule, seed)    # the one training loop (train.loop)
    task.metrics(model, result)                  # the task's entries of metrics.json
    task.checkpoint_meta()                       # the task's entries of the checkpoint metadata
    task.write_outputs(run_dir, title, model, result)   # learning curves + the task's own files

and the CLI prints ``TaskClass.report_lines(results)`` under its results table.
``avel-train evaluate --run RUN`` (:func:`train.runner.evaluate_run`) scores a finished run
again with :meth:`evaluate` and :meth:`split_metrics`, the methods that gave its metrics.json.

What :func:`train.loop.fit` asks of a task:

- ``train_cfg`` (the ``train`` section), ``device``, ``splits`` (the loaded splits by name);
- :meth:`train_batches`: the batches of one epoch of the train split, dicts holding
  ``audio`` [B, ...] and ``visual`` [B, ...] (the head's inputs) and the targets of the loss, in the
  order of :attr:`Task.order` (a :class:`train.data.BatchOrder`: shuffled or the manifest's order,
  last partial batch kept or dropped), which :func:`train.loop.fit` sets from the run's protocol
  (:mod:`train.protocol`) before the first epoch;
- :meth:`batch_finite` (from the host: are the batch's inputs finite), :meth:`batch_videos` (the
  videos of a batch, named when a batch holds NaN/inf) and :attr:`input_arrays` (the store array
  each batch input is read from);
- :meth:`loss` (default: the head's loss with ``train.weak_pool``) and, optionally,
  :meth:`batch_accuracy` (hits of the training predictions, for the ``train_accuracy`` column);
- :meth:`prepare_evaluation` (before every evaluation; default nothing) and :meth:`evaluate`, which
  scores one split as an :class:`Evaluation`: the number selection maximises, the epoch-row
  columns, and the task's full result (what ``FitResult.results`` holds for val and test);
- :meth:`split_metrics` turns such a result into the metrics.json entries of the split
  (``test_accuracy``...), for :meth:`metrics` and for ``avel-train evaluate`` alike.

Errors a user can fix (a missing store, missing arrays, a manifest that does not fit, bad head
options) are raised by :meth:`Task.prepare` / :meth:`Task.build_head` before any run folder is
made; a ``ValueError`` raised there becomes a :class:`train.runner.SetupError` (the CLI prints it
as one line and exits 2).

Every task's :meth:`Task.metrics` gives a ``baseline`` entry: for each headline metric of the task
(e.g. ``test_accuracy``) the value of a trivial predictor on the same data, ``{"value": ..,
"method": ..}`` (avel: majority class; cml: chance; sol: centre box).
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, ClassVar, Iterator, Mapping

import numpy as np
import torch

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Evaluation:
    """One split scored by a task.

    ``score``: what model selection maximises (higher is better); ``columns``: the entries of the
    epoch row, named without the split (``{"loss": .., "accuracy": ..}`` becomes ``val_loss``,
    ``val_accuracy``); ``result``: the task's full result (per-class tables, predictions...)."""

    score: float
    columns: dict[str, float]
    result: Any


class Task:
    """Base class of the tasks; see the module docstring for the life of a run.

    Subclasses set ``selection_metric`` (a description for metrics.json) and implement
    :meth:`prepare`, :meth:`build_head`, :meth:`train_batches`, :meth:`evaluate` and
    :meth:`metrics`; the other methods have defaults."""

    #: set by :func:`train.registry.register_task`
    name: ClassVar[str] = ""
    #: what selection maximises, in words (metrics.json ``selection_metric``)
    selection_metric: ClassVar[str] = ""
    #: the store array each floating-point input of a training batch is read from (named when
    #: an input holds NaN/inf)
    input_arrays: ClassVar[dict[str, str]] = {"audio": "audio", "visual": "visual"}

    def __init__(self, train_cfg, device: torch.device | str, splits: Mapping[str, Any], num_classes: int,
                 pipeline=None):
        self.train_cfg = train_cfg
        self.device = torch.device(device)
        self.splits = dict(splits)
        self.num_classes = int(num_classes)
        self.pipeline = pipeline
        from ..data import BatchOrder

        #: the batch order of every epoch (set by :func:`train.loop.fit` from the run's protocol)
        self.order = BatchOrder(shuffle=bool(getattr(train_cfg, "shuffle", True)))

    # -- data preparation -------------------------------------------------------------------
    @classmethod
    def prepare(cls, pipeline, device: torch.device) -> "Task":  # pragma: no cover - interface
        """Read the store and the split manifests of ``pipeline`` (refusing an incomplete store)."""
        raise NotImplementedError

    def build_head(self, head_name: str):  # pragma: no cover - interface
        """The registered head ``head_name`` of this task with its ``heads.<name>`` overrides, on
        :attr:`device`."""
        raise NotImplementedError

    def attach(self, model) -> None:
        """Prepare what depends on the built head (cml: visual maps pre-pooled for heads without
        spatial input). Default: nothing."""

    # -- training ---------------------------------------------------------------------------
    def train_batches(self, model, batch_size: int, generator: torch.Generator,
                      rng: np.random.Generator) -> Iterator[dict[str, torch.Tensor]]:  # pragma: no cover
        """The batches of the train split for one epoch in the order of :attr:`order` (a shuffle
        drawn from ``generator``, or from ``rng`` for draws made in numpy)."""
        raise NotImplementedError

    def batch_videos(self, batch: Mapping[str, Any]) -> list[str]:
        """The video of each row of a training batch (store keys), as named in error messages.
        Default: ``batch["videos"]`` when the batch carries it, else none."""
        return [str(v) for v in batch.get("videos", [])]

    def batch_finite(self, batch: Mapping[str, Any]) -> bool | None:
        """Whether every floating-point input of a training batch is finite, answered from the
        host without waiting for the device (the tasks check their inputs once, when loaded), or
        None when the task cannot tell that way (default): the loop then checks the batch on the
        device, which costs a synchronisation per batch."""
        return None

    def loss(self, model, out, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The training loss of a batch: the head's loss, with ``train.weak_pool``."""
        return model.loss(out, batch, self.train_cfg.weak_pool)

    def batch_accuracy(self, model, out, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor | int, int] | None:
        """(correct, counted) predictions of a training batch, or None when the task has no
        training accuracy (default). ``correct`` may stay a tensor on the device (the loop sums it
        there), ``counted`` is a host int."""
        return None

    # -- evaluation -------------------------------------------------------------------------
    def prepare_evaluation(self, model) -> None:
        """Run before every evaluation, with the weights to evaluate. Default: nothing."""

    def evaluate(self, model, split_name: str) -> Evaluation:  # pragma: no cover - interface
        """Score the split ``split_name`` with the current weights."""
        raise NotImplementedError

    def split_metrics(self, role: str, result) -> dict[str, Any]:  # pragma: no cover - interface
        """The metrics.json entries of one split scored by :meth:`evaluate` (``result`` =
        ``Evaluation.result``), named by ``role`` (``val``, ``test``, ``train``): at least
        ``<role>_accuracy``. :meth:`metrics` takes its val/test figures from here, and so does
        ``avel-train evaluate``, so the two cannot differ."""
        raise NotImplementedError

    # -- outputs ----------------------------------------------------------------------------
    def store_identity(self) -> dict[str, Any]:
        """``store`` and ``store_fingerprint`` of metrics.json."""
        return {"store": "", "store_fingerprint": ""}

    def metrics(self, model, result) -> dict[str, Any]:  # pragma: no cover - interface
        """The task's entries of metrics.json (its data counts and val/test figures, the latter
        from :meth:`split_metrics`). An entry ``schedule`` is merged into the common schedule
        entry."""
        raise NotImplementedError

    def checkpoint_meta(self) -> dict[str, Any]:
        """Entries of the checkpoint metadata beside the common ones (task, head, head_config,
        num_classes, setting, seed, selected_epoch)."""
        return {}

    def write_outputs(self, run_dir: Path, title: str, model, result) -> None:
        """Files beside config.yaml / metrics.json / epochs.csv / checkpoint: learning_curves.png
        here, each task adds its own."""
        from .. import plots

        plots.plot_learning_curves(result.epochs, run_dir / "learning_curves.png", title, result.best_epoch)

    @staticmethod
    def report_lines(results: list[dict[str, Any]]) -> str | None:
        """What ``avel-train`` prints after the results table for the runs' metrics (default:
        nothing)."""
        return None

    # -- prediction (avel-predict, render-sol) ------------------------------------------------
    #: what the spatial maps of :meth:`predict_windows` are: ``"attention"`` (the head's spatial
    #: attention) or ``"sounding_object"`` (a sounding-object map, boxed by Otsu); it names
    #: avel-predict's output files (``attention.npy`` / ``sounding_object.npy`` and their pictures)
    prediction_maps: ClassVar[str] = "attention"

    @classmethod
    def can_predict(cls) -> bool:
        """Whether ``avel-predict`` can run this task's heads on new videos: the task provides
        :meth:`open_prediction_store` and :meth:`predict_windows` (a task without them cannot
        be predicted; ``train.predict.run.predict_tasks`` lists those that can)."""
        return (getattr(cls.open_prediction_store, "__func__", None) is not Task.open_prediction_store.__func__
                and getattr(cls.predict_windows, "__func__", None) is not Task.predict_windows.__func__)

    @classmethod
    def can_render_frames(cls) -> bool:
        """Whether ``render-sol`` can draw this task's maps over decoded frames (:meth:`frame_outputs`)."""
        return getattr(cls.frame_outputs, "__func__", None) is not Task.frame_outputs.__func__

    @classmethod
    def open_prediction_store(cls, path, segments: int):
        """Open the feature store of new videos (avel-predict's, or a training store for
        render-sol) for this task's heads: a complete store holding the arrays
        :meth:`predict_windows` reads, with ``segments`` (T) seconds per row; a
        :class:`extract.core.store.StoreError` saying what is missing otherwise."""
        raise NotImplementedError(f"task {cls.name!r} does not predict new videos")

    @classmethod
    def predict_windows(cls, model, store, rows: np.ndarray, device="cpu"
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """The head ``model`` (eval mode, no gradients) on the video windows at store ``rows`` [N]
        (in that order, each one row of T seconds), reading a bounded number of rows at a time.

        Returns ``(labels [N, T] int class ids, probabilities [N, T, C+1] float, maps [N, T, h, w]
        float or None)``: a second's label is the head's own prediction rule, its probabilities
        the softmax of its scores (the last class is background), ``maps`` the spatial maps of
        :attr:`prediction_maps`, None when the head has none (for heads of task avel: their
        :attr:`~train.heads.base.HeadOutput.spatial`)."""
        raise NotImplementedError(f"task {cls.name!r} does not predict new videos")

    @classmethod
    def frame_outputs(cls, model, store, rows, device="cpu") -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
        """Per decoded frame, for drawing maps over the frames they were computed from
        (``render-sol``): yields ``(row, probabilities [T, F, C+1], maps [T, F, h, w],
        frame_index [T, F])`` per store row of ``rows``, ``frame_index`` the decoder-order index
        of each frame in its video file (-1: none). Default: not provided."""
        raise NotImplementedError(f"task {cls.name!r} has no per-frame maps to draw")


def majority_baseline(labels: np.ndarray, class_names: list[str]) -> tuple[float, str]:
    """(share, class name) of the most frequent label of ``labels`` (any shape; ties: the lowest
    class index): the accuracy of always predicting that class."""
    flat = np.asarray(labels).reshape(-1).astype(np.int64)
    if flat.size == 0:
        return float("nan"), ""
    counts = np.bincount(flat, minlength=len(class_names))
    top = int(np.argmax(counts))
    return float(counts[top] / flat.size), (class_names[top] if top < len(class_names) else str(top))


def baseline_entry(value: float | None, method: str) -> dict[str, Any]:
    """One entry of metrics.json ``baseline``: ``{"value": .., "method": ..}``."""
    return {"value": value, "method": method}


def store_recipe(store_path, fingerprint: str, attrs: Mapping[str, Any] | None, segments: int, pipeline=None) -> dict[str, Any]:
    """What made a run's training store, for its checkpoint (``features``): the store's
    fingerprint, the fields the fingerprint hashes, the full extractor configuration and T (root
    attributes of the store), plus the training pipeline's feature cache folder (absolute), which
    ``avel-predict`` (:mod:`train.predict.run`) uses to compute the same features for new videos."""
    attrs = dict(attrs or {})
    cache_root = None
    if pipeline is not None and hasattr(pipeline, "store"):
        cache_root = str(pipeline.path(pipeline.store.cache_root).resolve())
    return {
        "store": str(store_path),
        "fingerprint": fingerprint,
        "fingerprint_fields": attrs.get("fingerprint_fields"),
        "extractor": attrs.get("extractor"),
        "segments": int(segments),
        "cache_root": cache_root,
    }


def head_for_task(pipeline, head_name: str, task: str, num_classes: int):
    """The registered head ``head_name`` of ``task`` built with its overrides (not yet moved to a
    device)."""
    from ..runs import head_class_and_config

    head_cls, config = head_class_and_config(pipeline, head_name, task)
    return head_cls(num_classes=num_classes, setting=pipeline.train.setting, config=config)
