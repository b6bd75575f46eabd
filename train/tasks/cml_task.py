"""Task "cml": cross-modality localization (Tian et al. ECCV 2018 sec. 5 / Table 3; Xue et al.
TMM 2021 sec. III-D) on a feature store.

A run (:func:`train.runner.run` with ``train.task: cml``):

1. loads the store and the train / val / test manifests (:func:`train.data.load_from_pipeline`,
   shared with the avel task);
2. builds training pairs: every valid segment of every training video, label 1 inside an event
   of that video (:func:`train.cml_metrics.match_labels`). Segment-wise heads (AVDLN, DCCA) train on
   shuffled single segments as the reference ``cmm_train.py`` does; sequence heads (co-attention)
   on whole videos;
3. evaluates A2V / V2A exact-match accuracy on the queries of a split (samples with an event of
   length 0 < l < T whose T segments all have features), selecting the epoch on the mean of the
   two on the val split (``train.select_on``);
4. writes the run directory like the avel task (config.yaml, metrics.json, epochs.csv,
   checkpoint.safetensors, learning_curves.png) plus ``predictions_<split>.csv`` (one row per
   query: true and predicted starts) and ``distances_test.png``.

Accuracies in metrics.json and epochs.csv are fractions (as the avel task's); the ``val`` / ``test``
sections also give them in percent next to the chance level of the same queries.
"""
from __future__ import annotations

import csv
import dataclasses
import logging
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from .. import cml_metrics as cml
from ..data import BatchOrder, TaskData, epoch_batches, load_from_pipeline
from ..heads.base import total_loss
from ..registry import register_task
from ..runs import splits_to_load
from .base import Evaluation, Task, baseline_entry, head_for_task

log = logging.getLogger(__name__)

#: videos per forward pass when computing distance matrices
EVAL_BATCH = 128


# ---------------------------------------------------------------------------------------------
# data


@dataclasses.dataclass
class CmlSplit:
    """The videos of one split and their CML queries.

    ``audio`` [V, T, 128] f32, ``match`` [V, T] f32 pair labels, ``valid`` [V, T] bool, ``keys``
    [V]; visual maps are rows ``visual_rows`` [V] of ``visual_source`` (the bank's f16
    [R, T, 7, 7, 512], not copied; or f32 [V, T, 1, 1, 512] pre-pooled for heads without spatial
    input), read per batch by :meth:`visual`. ``queries`` index videos by ``query_video`` [Q].
    """

    name: str
    keys: list[str]
    audio: torch.Tensor
    visual_source: torch.Tensor
    visual_rows: torch.Tensor
    match: torch.Tensor
    valid: torch.Tensor
    queries: list[cml.CmlQuery]
    query_video: np.ndarray
    skipped_queries: list[str]

    @property
    def segments(self) -> int:
        return int(self.audio.shape[1])

    def visual(self, index: torch.Tensor | slice) -> torch.Tensor:
        """Visual maps of videos ``index`` as f32 [b, T, H, W, 512]."""
        return self.visual_source.index_select(0, self.visual_rows[index]).float()

    def flat_segments(self) -> dict[str, torch.Tensor]:
        """Every valid segment as its own T = 1 sequence: audio [N, 1, 128], visual [N, 1, H, W, C],
        match [N, 1], valid [N, 1], and ``video`` [N] (the position of its video in ``keys``). Meant for pre-pooled splits (49x smaller)."""
        keep = self.valid.reshape(-1)
        visual = self.visual(slice(None))
        video = torch.arange(len(self.keys), device=self.audio.device).repeat_interleave(self.segments)
        return {
            "audio": self.audio.reshape(-1, 1, *self.audio.shape[2:])[keep],
            "visual": visual.reshape(-1, 1, *visual.shape[2:])[keep],
            "match": self.match.reshape(-1, 1)[keep],
            "valid": self.valid.reshape(-1, 1)[keep],
            "video": video[keep.to(video.device)],
        }


def pooled_visual_rows(visual: torch.Tensor, index: torch.Tensor, block: int = 256) -> torch.Tensor:
    """Global average of the maps of rows ``index`` of ``visual`` [R, T, H, W, C], computed
    ``block`` rows at a time (no f32 copy of the whole split): [len(index), T, 1, 1, C] f32."""
    parts = [visual.index_select(0, index[i:i + block]).float().mean(dim=(2, 3), keepdim=True)
             for i in range(0, len(index), block)]
    return torch.cat(parts) if parts else visual.new_zeros((0, visual.shape[1], 1, 1, visual.shape[-1]), dtype=torch.float32)


def make_cml_split(data: TaskData, split_name: str, pooled_visual: bool) -> CmlSplit:
    """The videos of split ``split_name`` (one per distinct bank row), their pair labels and the
    evaluable queries (events 0 < l < T whose video has features for every segment)."""
    split, bank = data.splits[split_name], data.bank
    T = bank.segments
    by_id = {s.sample_id: s for s in split.manifest.samples}
    samples = [by_id[sid] for sid in split.sample_ids]
    rows = split.rows.cpu().numpy()
    video_rows = list(dict.fromkeys(int(r) for r in rows))
    position = {r: i for i, r in enumerate(video_rows)}
    keys = [bank.keys[r] for r in video_rows]
    # pair labels per video: union of the events of its samples (Sample.key = the bank row's key)
    labels_by_key = cml.match_labels(samples, T)
    match = torch.from_numpy(np.stack([labels_by_key[k] for k in keys]) if keys else np.zeros((0, T), np.float32))
    index = torch.as_tensor(video_rows, dtype=torch.long, device=bank.device)
    if pooled_visual:
        visual_source = pooled_visual_rows(bank.visual, index)
        visual_rows = torch.arange(len(video_rows), device=bank.device)
    else:
        visual_source, visual_rows = bank.visual, index
    valid = bank.valid.index_select(0, index).bool()
    queries, query_video, skipped = [], [], []
    row_of_sample = {s.sample_id: int(r) for s, r in zip(samples, rows)}
    valid_np = valid.cpu().numpy()
    for q in cml.cml_queries(samples, T):
        v = position[row_of_sample[q.sample_id]]
        if not valid_np[v].all():
            skipped.append(q.sample_id)
            continue
        queries.append(q)
        query_video.append(v)
    if skipped:
        log.warning("%s: %d CML queries skipped (their video lacks features for some segments)", split_name, len(skipped))
    return CmlSplit(split_name, keys, bank.audio.index_select(0, index).float(), visual_source, visual_rows,
                    match.to(bank.device), valid, queries, np.asarray(query_video, dtype=np.int64), skipped)


# ---------------------------------------------------------------------------------------------
# training and evaluation


def training_batches(train: CmlSplit, flat: dict[str, torch.Tensor] | None, batch_size: int,
                     generator: torch.Generator, order: BatchOrder = BatchOrder()) -> Iterator[dict[str, torch.Tensor]]:
    """Batches in the order of ``order`` (shuffled from ``generator`` by default): of single
    segments for segment-wise heads (``flat``), else of videos; ``video`` [B] = the position of each
    row's video in ``train.keys``; ``index`` [B] (numpy, host) = the rows' positions in ``flat``
    (segments) or ``train.keys`` (videos). The order is copied to the device once per epoch."""
    if flat is not None:
        for host, idx in epoch_batches(flat["audio"].shape[0], batch_size, order, generator, flat["audio"].device):
            yield {**{k: v[idx] for k, v in flat.items()}, "index": host}
        return
    for host, idx in epoch_batches(len(train.keys), batch_size, order, generator, train.audio.device):
        yield {"audio": train.audio[idx], "visual": train.visual(idx), "match": train.match[idx], "valid": train.valid[idx],
               "video": idx, "index": host}


@dataclasses.dataclass
class CmlResult:
    """Metrics of one split (accuracies in %), the predictions per query and the distance
    matrices of the query videos."""

    metrics: dict[str, float]
    predictions: dict[str, np.ndarray]
    distances: np.ndarray  # [Q, T, T] audio i vs visual j
    loss: float

    def to_json(self) -> dict[str, Any]:
        m = self.metrics
        return {
            "a2v_percent": m["a2v_acc"], "v2a_percent": m["v2a_acc"], "mean_percent": m["mean_acc"],
            "chance_percent": m["chance_acc"], "queries": int(m["num_samples"]), "loss": self.loss,
        }


@torch.no_grad()
def evaluate(model, split: CmlSplit, weak_pool: str = "mean") -> CmlResult:
    """Distance matrices of the split's videos, the window search for every query, the metric,
    and the mean loss of the split's pairs."""
    model.eval()
    if not split.queries:
        raise ValueError(
            f"split {split.name!r} has no CML query (no event shorter than the video with features for "
            "every segment); cross-modality localization cannot be evaluated on it"
        )
    dists, loss_sum, n_sum = [], torch.zeros((), dtype=torch.float64, device=split.audio.device), 0
    for start in range(0, len(split.keys), EVAL_BATCH):  # on the device; one transfer at the end
        sl = slice(start, start + EVAL_BATCH)
        out = model(split.audio[sl], split.visual(sl))
        dists.append(model.distance_matrix(out).float())
        n = int(split.audio[sl].shape[0])
        loss_sum += total_loss(model.loss(out, {"match": split.match[sl], "valid": split.valid[sl]}, weak_pool)).double() * n
        n_sum += n
    dist = torch.cat(dists).cpu().numpy()[split.query_video]
    onsets = [q.onset for q in split.queries]
    lengths = [q.length for q in split.queries]
    metrics = cml.cml_metrics(dist, onsets, lengths)
    preds = cml.predict_starts(dist, onsets, lengths)
    return CmlResult(metrics, preds, dist, float(loss_sum) / max(n_sum, 1))


# ---------------------------------------------------------------------------------------------
# the task


@register_task("cml")
class CmlTask(Task):
    """Cross-modality localization: matched (audio t, visual t) pairs of every training video,
    scored by A2V / V2A exact-match accuracy of the window search on a split's queries. The data
    is the avel task's :class:`train.data.TaskData`; :meth:`attach` turns its splits into
    :class:`CmlSplit` (visual maps pre-pooled for heads without spatial input)."""

    selection_metric = "mean of A2V and V2A exact-match accuracy"

    def __init__(self, data: TaskData, train_cfg, pipeline=None):
        super().__init__(train_cfg, data.bank.device, data.splits, data.num_classes, pipeline)
        self.data = data
        self.flat: dict[str, torch.Tensor] | None = None
        #: [rows of a training batch's ``index``] bool, host: the row's inputs are finite
        self.finite: np.ndarray | None = None

    @classmethod
    def prepare(cls, pipeline, device: torch.device) -> "CmlTask":
        return cls(load_from_pipeline(pipeline, splits_to_load(pipeline), device), pipeline.train, pipeline)

    def build_head(self, head_name: str):
        """The registered CML head with its overrides; a co-attention head with ``init_from`` is
        initialised from that supervised checkpoint (path relative to the pipeline)."""
        head = head_for_task(self.pipeline, head_name, self.name, self.num_classes)
        init_from = getattr(head.config, "init_from", "")
        if init_from:
            head.init_from_checkpoint(self.pipeline.path(init_from))
        return head.to(self.device)

    def attach(self, model) -> None:
        """The CML view of every split; for segment-wise heads also the flat training pairs."""
        self.splits = {name: make_cml_split(self.data, name, not model.uses_spatial) for name in self.data.splits}
        train = self.splits[self.train_cfg.train_split]
        self.flat = train.flat_segments() if model.segment_wise else None
        from ..data import finite_rows

        if self.flat is not None:
            self.finite = finite_rows(self.flat["audio"], self.flat["visual"])
        else:  # videos: their audio rows, and their rows of the visual source (the bank's, checked when loaded)
            source = train.visual_source
            visual_ok = self.data.bank.finite_rows() if source is self.data.bank.visual else finite_rows(source)
            self.finite = finite_rows(train.audio) & visual_ok[train.visual_rows.cpu().numpy()]

    def batch_finite(self, batch) -> bool | None:
        """From the training rows' check made in :meth:`attach`."""
        return None if self.finite is None else bool(self.finite[np.asarray(batch["index"])].all())

    def train_batches(self, model, batch_size, generator, rng):
        return training_batches(self.splits[self.train_cfg.train_split], self.flat, batch_size, generator, self.order)

    def batch_videos(self, batch) -> list[str]:
        """Store keys of the videos of a training batch's rows (segments or whole videos)."""
        keys = self.splits[self.train_cfg.train_split].keys
        return [keys[int(v)] for v in batch["video"].tolist()]

    def prepare_evaluation(self, model) -> None:
        """The head's pre-evaluation hook (DCCA: fit its linear CCA) on the training pairs."""
        if self.flat is not None:
            flat = self.flat
            model.prepare_eval(flat["audio"], flat["visual"], flat["match"], flat["valid"])

    def evaluate(self, model, split_name: str) -> Evaluation:
        res = evaluate(model, self.splits[split_name], self.train_cfg.weak_pool)
        m = res.metrics
        columns = {"loss": res.loss, "a2v_accuracy": m["a2v_acc"] / 100, "v2a_accuracy": m["v2a_acc"] / 100,
                   "chance_accuracy": m["chance_acc"] / 100}
        return Evaluation(m["mean_acc"], columns, res)

    def store_identity(self) -> dict[str, Any]:
        return {"store": str(self.data.bank.store_path), "store_fingerprint": self.data.bank.fingerprint}

    def metrics(self, model, result) -> dict[str, Any]:
        """Videos, pairs and queries per split, and per split A2V / V2A / chance:
        ``<role>_accuracy`` = mean of A2V and V2A (fraction, what the CLI table shows);
        ``<role>_a2v_accuracy``, ``<role>_v2a_accuracy``, ``<role>_chance_accuracy`` (fractions)."""
        splits = self.splits
        metrics: dict[str, Any] = {
            "schedule": {"batch_unit": "segments" if model.segment_wise else "videos"},
            "videos": {name: len(sp.keys) for name, sp in splits.items()},
            "training_pairs": int(splits[self.train_cfg.train_split].valid.sum()),
            "queries": {name: len(sp.queries) for name, sp in splits.items()},
            "skipped_queries": {name: len(sp.skipped_queries) for name, sp in splits.items()},
            "skipped_samples": {name: len(split.skipped) for name, split in self.data.splits.items()},
        }
        for role in ("val", "test"):
            res = result.results.get(role)
            for key in ("accuracy", "a2v_accuracy", "v2a_accuracy", "chance_accuracy"):
                metrics[f"{role}_{key}"] = None
            if res is not None:
                metrics.update(self.split_metrics(role, res))
        metrics["baseline"] = self.baseline(metrics)
        return metrics

    def split_metrics(self, role: str, result: CmlResult) -> dict[str, Any]:
        """``<role>_accuracy`` = mean of A2V and V2A, ``<role>_a2v_accuracy``,
        ``<role>_v2a_accuracy``, ``<role>_chance_accuracy`` (fractions) and ``<role>``
        (:meth:`CmlResult.to_json`, in percent)."""
        m = result.metrics
        return {f"{role}_accuracy": m["mean_acc"] / 100, f"{role}_a2v_accuracy": m["a2v_acc"] / 100,
                f"{role}_v2a_accuracy": m["v2a_acc"] / 100, f"{role}_chance_accuracy": m["chance_acc"] / 100,
                role: result.to_json()}

    @staticmethod
    def baseline(metrics: dict[str, Any]) -> dict[str, Any]:
        """Chance of A2V, V2A and their mean on the same queries: a uniformly drawn start of the
        l-second window is right with probability 1 / (T - l + 1), averaged over the queries."""
        out: dict[str, Any] = {}
        method = "chance: mean over the queries of 1 / (T - l + 1)"
        for role in ("val", "test"):
            chance = metrics.get(f"{role}_chance_accuracy")
            if chance is None:
                continue
            for key in ("accuracy", "a2v_accuracy", "v2a_accuracy"):
                out[f"{role}_{key}"] = baseline_entry(chance, method)
        return out

    def write_outputs(self, run_dir: Path, title: str, model, result) -> None:
        """learning_curves.png, predictions_<role>.csv, distances_test.png."""
        super().write_outputs(run_dir, title, model, result)
        cfg = self.train_cfg
        for role, res in result.results.items():
            write_predictions(run_dir / f"predictions_{role}.csv", self.splits[getattr(cfg, f"{role}_split")], res)
        test = result.results.get("test")
        if test is not None:
            plot_distances(test, self.splits[cfg.test_split], run_dir / "distances_test.png", title, cfg.timeline_videos)

    @staticmethod
    def report_lines(results: list[dict[str, Any]]) -> str:
        """Test A2V and V2A exact-match accuracy (%) with the chance level of the same queries,
        mean ± std over seeds."""
        from ..runs import mean_std_text

        def cell(key: str) -> str:
            return mean_std_text([100 * r[key] for r in results if r.get(key) is not None], 1, "%")

        n = len(results)
        return (f"test A2V {cell('test_a2v_accuracy')}, V2A {cell('test_v2a_accuracy')} "
                f"(chance {cell('test_chance_accuracy')}; exact start match{f', {n} seeds' if n > 1 else ''})")


def write_predictions(path: Path, split: CmlSplit, res: CmlResult) -> Path:
    """One row per query: sample, video key, event onset and length, predicted A2V / V2A starts."""
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["sample_id", "key", "onset", "length", "a2v_start", "v2a_start", "a2v_correct", "v2a_correct"])
        for q, a2v, v2a in zip(split.queries, res.predictions["a2v"], res.predictions["v2a"]):
            writer.writerow([q.sample_id, q.key, q.onset, q.length, int(a2v), int(v2a), int(a2v == q.onset), int(v2a == q.onset)])
    return path


def plot_distances(res: CmlResult, split: CmlSplit, path: Path, title: str, count: int) -> Path | None:
    """distances_test.png: see :func:`distances_figure`; None when the split has no query."""
    fig = distances_figure(res, split, title, count)
    if fig is None:
        return None
    from ..plots import save_figure

    return save_figure(fig, path)


def distances_figure(res: CmlResult, split: CmlSplit, title: str, count: int):
    """Audio x visual distance matrices of the first ``count`` test queries, each with a colour
    bar (the head's distance), the true event (green square on the diagonal) and the A2V (red) /
    V2A (blue) predicted windows. A matplotlib figure: one image axes and one colour-bar axes per
    query (None when there is no query)."""
    from ..plots import pyplot

    n = min(count, len(split.queries))
    if n == 0:
        return None
    plt = pyplot()
    from matplotlib.patches import Rectangle

    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.9 * rows + 0.6), squeeze=False)
    for ax in axes.ravel()[n:]:
        ax.remove()
    for i, ax in enumerate(axes.ravel()[:n]):
        q = split.queries[i]
        im = ax.imshow(res.distances[i], cmap="viridis")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="distance (lower = closer)")
        lo, l = q.onset - 0.5, q.length
        a2v, v2a = int(res.predictions["a2v"][i]), int(res.predictions["v2a"][i])
        ax.add_patch(Rectangle((lo, lo), l, l, fill=False, edgecolor="lime", linewidth=2, label="event"))
        ax.add_patch(Rectangle((a2v - 0.5, lo), l, l, fill=False, edgecolor="red", linestyle="--", label=f"A2V {a2v}"))
        ax.add_patch(Rectangle((lo, v2a - 0.5), l, l, fill=False, edgecolor="deepskyblue", linestyle=":", label=f"V2A {v2a}"))
        ax.set_title(f"{q.sample_id}: onset {q.onset}, l={q.length}", fontsize=9)
        ax.set_xlabel("visual segment")
        ax.set_ylabel("audio segment")
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{title}\nA2V {res.metrics['a2v_acc']:.1f}%  V2A {res.metrics['v2a_acc']:.1f}%  chance {res.metrics['chance_acc']:.1f}%", fontsize=10)
    fig.tight_layout()
    return fig
