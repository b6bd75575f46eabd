"""Task "sol": sounding object localization with the STM head (Li, Tian & Xu, BMVC 2021).

A run (:func:`train.runner.run` with ``train.task: sol``):

1. reads the train / val / test manifests against a store that holds the per-frame maps
   (``frame_maps`` [N, T, F, 8, 8, 2048], ``frame_index`` [N, T, F], ``audio_maps``
   [N, T, 6, 4, 512]; extractors ``resnet152_maps`` + ``vggish_maps``). The maps are far too big
   to hold in memory (AVE: ~40 GB), so batches are read from the store as they are needed;
2. trains as the paper (section 4.2): each sample is one random valid second of a video, its F
   frames are the T = F timesteps (paper: 4), every frame paired with its second's audio map
   (the store holds one VGGish patch per second), labelled with that second's class (background
   included, section 3.4); Adam, the head's schedule (lr 1e-4, batch 128, 30 epochs);
3. selects the epoch on per-frame event classification accuracy of the selection split
   (``train.select_on``; no split but test has boxes);
4. evaluates localization on the test videos that have a box file under ``sol.boxes_root``:
   each video runs as one sequence of T x F frames (causal memory), and every sampled frame that
   is annotated (``frame_index`` is the annotation's frame number) is scored with cIoU and box IoU
   (:func:`train.sol_metrics.evaluate_frame`), giving cIoU@0.5 and IoU@0.5 (share of frames >= 0.5),
   beside the centre-box baseline scored the same way on the same frames (a box of half the
   frame's width and height in its centre, :func:`train.sol_metrics.evaluate_centre_box`);
5. writes the run directory (config.yaml, metrics.json, epochs.csv, checkpoint.safetensors,
   learning_curves.png) plus ``localization_test.csv`` (one row per scored frame).

Before anything is trained, :meth:`SolTask.prepare` checks the store (complete, with the map
arrays), the manifests, and the box folder ``sol.boxes_root``: it must exist and hold a box file
for every test video with an event (``sol.allow_missing_boxes: true`` scores only the videos that
have one).

For prediction (``avel-predict``, ``render-sol``: :mod:`train.predict`) the task gives the hooks
of :class:`train.tasks.base.Task`: :meth:`SolTask.open_prediction_store`,
:meth:`SolTask.predict_windows` (per-second classes and sounding-object maps) and
:meth:`SolTask.frame_outputs` (per sampled frame, for drawing over the decoded frames).
"""
from __future__ import annotations

import csv
import dataclasses
import logging
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from extract.core.manifest import read_manifest
from extract.core.store import FeatureStore, StoreError, open_store, require_complete

from .. import sol_metrics as sol
from ..data import DataError, match_rows, split_manifest
from ..registry import register_task
from ..runs import head_class_and_config, splits_to_load
from .base import Evaluation, Task, baseline_entry, majority_baseline, store_recipe

log = logging.getLogger(__name__)

#: the store arrays the task reads
MAP_ARRAYS = ("frame_maps", "frame_index", "audio_maps", "valid")
#: threads reading (decompressing) store rows for a batch
READ_THREADS = 8
#: whole videos per forward pass when predicting (each is one sequence of T x F frames)
PREDICT_VIDEOS = 8


# ---------------------------------------------------------------------------------------------
# data


@dataclasses.dataclass
class SolSplit:
    """Samples of one split: store ``rows`` [N], segment ``labels`` [N, T], ``valid`` [N, T]."""

    name: str
    sample_ids: list[str]
    keys: list[str]
    rows: np.ndarray
    labels: np.ndarray
    valid: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)

    def videos(self) -> list[int]:
        """Sample positions of the distinct store rows (first sample of each video)."""
        first: dict[int, int] = {}
        for i, r in enumerate(self.rows.tolist()):
            first.setdefault(int(r), i)
        return list(first.values())


def open_map_store(path: str | Path) -> FeatureStore:
    """Open a store, refuse it when incomplete (as every reader of a store does) and check it has
    the sounding-object arrays with consistent shapes."""
    store = open_store(path)
    require_complete(store)
    names = store.array_names()
    missing = [a for a in MAP_ARRAYS if a not in names]
    if missing:
        raise StoreError(
            f"{store.path}: arrays {missing} are missing (has: {', '.join(names)}); extract them with "
            "--set 'extract.extractors=[resnet152_maps,vggish_maps]'"
        )
    T = store.segments
    maps, index, audio = (store.array(n).shape for n in ("frame_maps", "frame_index", "audio_maps"))
    if len(maps) != 6 or maps[1] != T or tuple(index[1:]) != tuple(maps[1:3]) or len(audio) != 5 or audio[1] != T:
        raise StoreError(f"{store.path}: frame_maps {maps}, frame_index {index}, audio_maps {audio} do not fit [N, T={T}, F, ...]")
    return store


def load_split(store: FeatureStore, name: str, manifest_path: Path, skip_incomplete: bool) -> tuple[SolSplit, list[str]]:
    """Samples of ``manifest_path`` matched to store rows; returns the split and its class list."""
    manifest = read_manifest(manifest_path)
    keep, rows = match_rows(store, manifest, skip_incomplete)
    T = store.segments
    valid_all = np.asarray(store.read("valid"), dtype=bool)
    split = SolSplit(
        name=name,
        sample_ids=[manifest.samples[i].sample_id for i in keep],
        keys=[manifest.samples[i].key for i in keep],
        rows=rows,
        labels=manifest.segment_labels(T)[keep],
        valid=valid_all[rows] if len(rows) else np.zeros((0, T), bool),
    )
    return split, manifest.classes


def _parallel_read(array, selections: Sequence[Any]) -> np.ndarray:
    """``np.stack([array[sel] for sel in selections])`` with the reads spread over threads (each
    read decompresses a whole one-row chunk; the codecs release the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    if len(selections) <= 1:
        return np.stack([np.asarray(array[sel]) for sel in selections])
    with ThreadPoolExecutor(max_workers=min(READ_THREADS, len(selections))) as pool:
        return np.stack(list(pool.map(lambda sel: np.asarray(array[sel]), selections)))


def read_seconds(store: FeatureStore, rows: np.ndarray, seconds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The frames of one second per row: (frame_maps [B, F, 8, 8, Cv], audio_maps [B, 6, 4, Ca]),
    with each row's recorded scale applied."""
    selections = [(int(r), int(s)) for r, s in zip(rows, seconds)]
    return tuple(store.scaled(name, _parallel_read(store.array(name), selections), [int(r) for r in rows])
                 for name in ("frame_maps", "audio_maps"))


def sequence_inputs(frame_maps: np.ndarray, audio_maps: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole videos as frame sequences: frame_maps [B, T, F, h, w, Cv], audio_maps [B, T, 6, 4, Ca]
    -> (audio [B, T*F, 6, 4, Ca], visual [B, T*F, h, w, Cv]) float32, each frame with its second's audio."""
    B, T, F = frame_maps.shape[:3]
    visual = torch.from_numpy(np.ascontiguousarray(frame_maps)).to(device).float().reshape(B, T * F, *frame_maps.shape[3:])
    audio = torch.from_numpy(np.ascontiguousarray(audio_maps)).to(device).float()
    audio = audio.repeat_interleave(F, dim=1)
    return audio, visual


def random_valid_seconds(valid: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One uniformly drawn valid second per row of ``valid`` [B, T] (rows without one: second 0)."""
    out = np.zeros(len(valid), np.int64)
    for i, v in enumerate(valid):
        choices = np.flatnonzero(v)
        out[i] = rng.choice(choices) if choices.size else 0
    return out


def training_batches(store: FeatureStore, split: SolSplit, batch_size: int, rng: np.random.Generator,
                     device, shuffle: bool = True, drop_last: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of one random valid second per sample (samples without any valid second are left
    out), the samples in a random order drawn from ``rng`` (``shuffle``) or in the split's order;
    ``drop_last`` leaves out a last batch smaller than ``batch_size``: audio [B, F, 6, 4, Ca],
    visual [B, F, 8, 8, Cv], labels [B, F]; ``video`` [B] (sample positions in ``split``) and
    ``second`` [B] say where each row comes from; ``finite`` (bool) says whether the maps read were
    all finite (checked on the host, before the copy to the device)."""
    usable = np.flatnonzero(split.valid.any(1))
    order = usable[rng.permutation(len(usable))] if shuffle else usable
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    for start in range(0, stop, batch_size):
        idx = order[start:start + batch_size]
        seconds = random_valid_seconds(split.valid[idx], rng)
        v, a = read_seconds(store, split.rows[idx], seconds)
        F = v.shape[1]
        visual = torch.from_numpy(v).to(device).float()
        audio = torch.from_numpy(a).to(device).float()[:, None].expand(-1, F, -1, -1, -1)
        labels = torch.from_numpy(split.labels[idx, seconds]).to(device)[:, None].expand(-1, F)
        yield {"audio": audio, "visual": visual, "labels": labels, "video": torch.from_numpy(idx),
               "second": torch.from_numpy(seconds), "finite": bool(np.isfinite(v).all() and np.isfinite(a).all())}


@torch.no_grad()
def video_outputs(model, store: FeatureStore, rows: Sequence[int], batch: int, device) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Run whole videos (one sequence of T x F frames each) through the head.

    Yields ``(row, logits [T, F, C], attention [T, F, h, w])`` per store row, in order."""
    model.eval()
    maps, audio = store.array("frame_maps"), store.array("audio_maps")
    rows = [int(r) for r in rows]
    for start in range(0, len(rows), max(1, batch)):
        block = rows[start:start + batch]
        fm = store.scaled("frame_maps", _parallel_read(maps, block), block)
        am = store.scaled("audio_maps", _parallel_read(audio, block), block)
        T, F = fm.shape[1:3]
        a, v = sequence_inputs(fm, am, device)
        out = model(a, v)
        scores = out.scores.float().cpu().numpy().reshape(len(block), T, F, -1)
        att = out.spatial.float().cpu().numpy()  # the sounding-object map [B, T*F, h, w]
        att = att.reshape(len(block), T, F, *att.shape[2:])
        for i, r in enumerate(block):
            yield r, scores[i], att[i]


def classification_accuracy(model, store, split: SolSplit, batch: int, device) -> tuple[float, float]:
    """(accuracy, loss) of per-frame event classes over the valid seconds of the split's samples."""
    correct = total = 0
    loss_sum = 0.0
    outputs = {r: s for r, s, _ in video_outputs(model, store, sorted(set(split.rows.tolist())), batch, device)}
    for i, r in enumerate(split.rows.tolist()):
        scores = outputs[int(r)]  # T, F, C
        T, F, C = scores.shape
        keep = split.valid[i]
        if not keep.any():
            continue
        logits = torch.from_numpy(scores[keep].reshape(-1, C))
        labels = torch.from_numpy(np.repeat(split.labels[i][keep], F))
        loss_sum += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(-1) == labels).sum())
        total += int(labels.numel())
    return correct / max(total, 1), loss_sum / max(total, 1)


# ---------------------------------------------------------------------------------------------
# localization


@dataclasses.dataclass
class FrameRow:
    """One scored frame (boxes in the evaluation frame's pixels)."""

    key: str
    second: int
    slot: int
    frame: int
    ciou: float
    iou: float
    pred_box: np.ndarray | None
    gt_box: np.ndarray
    #: the centre-box baseline on the same frame
    centre_ciou: float = float("nan")
    centre_iou: float = float("nan")


def check_boxes(root: Path, keys: Sequence[str], allow_missing: bool = False) -> int:
    """Before training: the box folder exists and has a box file for every test video with an event
    (``keys``: their store keys; the video id is the part before '@'; a background-only video has
    no sounding object to box). With ``allow_missing``, videos without one are counted in
    a warning (at least one must have a file). Returns the number of videos with a file; raises
    :class:`DataError` otherwise."""
    if not root.is_dir():
        raise DataError(
            f"sol.boxes_root {root}: no box annotation folder there; the sol task scores its test videos against "
            "<video_id>/annotations.xml box files (CVAT XML): set sol.boxes_root (--set sol.boxes_root=FOLDER)"
        )
    try:
        files = sol.find_box_files(root)
    except sol.BoxFormatError as exc:
        raise DataError(str(exc)) from None
    videos = list(dict.fromkeys(k.split("@", 1)[0] for k in keys))
    missing = [v for v in videos if v not in files]
    if missing and (not allow_missing or len(missing) == len(videos)):
        from ..data import _listing

        raise DataError(
            f"sol.boxes_root {root}: {len(missing)} of {len(videos)} test videos with an event have no box file "
            f"(<video_id>/annotations.xml): {_listing(missing)}"
            + ("" if allow_missing else "; add them, or score only the annotated ones with --set sol.allow_missing_boxes=true")
        )
    if missing:
        log.warning("%s: %d of %d test videos have no box file and are not scored", root, len(missing), len(videos))
    return len(videos) - len(missing)


def load_boxes(root: Path, keys: Sequence[str]) -> dict[str, sol.VideoBoxes]:
    """Box files of ``keys`` (store keys; the video id is the part before '@') under ``root``."""
    files = sol.find_box_files(root)
    out = {}
    for key in keys:
        vid = key.split("@", 1)[0]
        if vid in files:
            out[key] = sol.read_cvat_xml(files[vid], vid)
    return out


def localize_split(model, store: FeatureStore, split: SolSplit, boxes: dict[str, sol.VideoBoxes], cfg, device) -> list[FrameRow]:
    """Score every annotated sampled frame of the split's videos that have boxes (and the
    centre-box baseline on the same frame)."""
    positions = [i for i in split.videos() if split.keys[i] in boxes]
    rows = [int(split.rows[i]) for i in positions]
    key_of_row = {int(split.rows[i]): split.keys[i] for i in positions}
    frame_index = store.array("frame_index")
    valid_of_row = {int(split.rows[i]): split.valid[i] for i in positions}
    out: list[FrameRow] = []
    eval_size = cfg.eval_size or None
    for r, _, att in video_outputs(model, store, rows, cfg.eval_batch, device):
        key = key_of_row[r]
        vb = boxes[key]
        index = np.asarray(frame_index[r])
        T, F = index.shape
        for t in range(T):
            if not valid_of_row[r][t]:
                continue
            for f in range(F):
                k = int(index[t, f])
                gt = vb.frames.get(k) if k >= 0 else None
                if gt is None:
                    continue
                s = sol.evaluate_frame(att[t, f], gt, (vb.height, vb.width), eval_size, cfg.map_threshold, cfg.otsu_floor)
                c = sol.evaluate_centre_box(gt, (vb.height, vb.width), eval_size, cfg.map_threshold)
                out.append(FrameRow(key, t, f, k, s.ciou, s.iou, s.pred_box, s.gt_box, c.ciou, c.iou))
    return out


def write_frames_csv(path: Path, rows: Sequence[FrameRow]) -> Path:
    """localization_<split>.csv: one row per scored frame."""
    def box(b):
        return "" if b is None else " ".join(f"{v:.1f}" for v in b)

    with path.open("w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["key", "second", "slot", "frame", "ciou", "iou", "pred_box", "gt_box", "centre_ciou", "centre_iou"])
        for r in rows:
            w.writerow([r.key, r.second, r.slot, r.frame, f"{r.ciou:.4f}", f"{r.iou:.4f}", box(r.pred_box), box(r.gt_box),
                        f"{r.centre_ciou:.4f}", f"{r.centre_iou:.4f}"])
    return path


# ---------------------------------------------------------------------------------------------
# the task


@dataclasses.dataclass
class ClassificationResult:
    """Per-frame event classification of a split (the selection metric)."""

    accuracy: float
    loss: float


@register_task("sol")
class SolTask(Task):
    """Sounding-object localization: trained on per-frame event classes (one random valid second
    per video and epoch, read from the store as needed), selected on per-frame classification
    accuracy, measured by cIoU / IoU of the test videos that have boxes."""

    selection_metric = "per-frame event classification accuracy (background included)"
    input_arrays = {"audio": "audio_maps", "visual": "frame_maps"}

    def __init__(self, store: FeatureStore, splits: dict[str, SolSplit], classes: list[str], train_cfg, sol_cfg,
                 device, pipeline=None):
        super().__init__(train_cfg, device, splits, len(classes) + 1, pipeline)
        self.store, self.classes, self.sol_cfg = store, list(classes), sol_cfg
        self.frames: list[FrameRow] = []

    @classmethod
    def prepare(cls, pipeline, device: torch.device) -> "SolTask":
        """Open the map store (refused when incomplete) and match every split's manifest to it."""
        cfg = pipeline.train
        store = open_map_store(pipeline.path(pipeline.store.path))
        splits, classes = {}, None
        for name in splits_to_load(pipeline):
            splits[name], found = load_split(store, name, split_manifest(pipeline, name), cfg.skip_incomplete)
            if classes is not None and found != classes:
                raise DataError(f"{split_manifest(pipeline, name)}: its class list differs from the other splits'")
            classes = found
        if not len(splits[cfg.train_split]) or not splits[cfg.train_split].valid.any():
            raise DataError(f"{split_manifest(pipeline, cfg.train_split)}: no training sample with a valid second in {store.path}")
        test = splits[cfg.test_split]
        background = len(classes or [])
        with_event = [k for k, labels in zip(test.keys, test.labels) if (labels != background).any()]
        check_boxes(pipeline.path(pipeline.sol.boxes_root), with_event, pipeline.sol.allow_missing_boxes)
        return cls(store, splits, classes or [], cfg, pipeline.sol, device, pipeline)

    def build_head(self, head_name: str):
        """The registered sol head with its overrides; the input channels must match the store's."""
        head_cls, config = head_class_and_config(self.pipeline, head_name, self.name)
        cv, ca = int(self.store.array("frame_maps").shape[-1]), int(self.store.array("audio_maps").shape[-1])
        if getattr(config, "visual_channels", cv) != cv or getattr(config, "audio_channels", ca) != ca:
            raise ValueError(
                f"heads.{head_name}: visual_channels/audio_channels = {config.visual_channels}/{config.audio_channels}, "
                f"but the store's maps have {cv}/{ca} channels"
            )
        return head_cls(num_classes=self.num_classes, setting=self.train_cfg.setting, config=config).to(self.device)

    def batch_videos(self, batch) -> list[str]:
        """``<store key> (second s)`` of each row of a training batch."""
        keys = self.splits[self.train_cfg.train_split].keys
        return [f"{keys[int(i)]} (second {int(t)})" for i, t in zip(batch["video"].tolist(), batch["second"].tolist())]

    def batch_finite(self, batch) -> bool:
        """The host check of the maps read for the batch (:func:`training_batches`)."""
        return batch["finite"]

    def train_batches(self, model, batch_size, generator, rng):
        return training_batches(self.store, self.splits[self.train_cfg.train_split], batch_size, rng, self.device,
                                self.order.shuffle, self.order.drop_last)

    def evaluate(self, model, split_name: str) -> Evaluation:
        acc, loss = classification_accuracy(model, self.store, self.splits[split_name], self.sol_cfg.eval_batch, self.device)
        return Evaluation(acc, {"loss": loss, "accuracy": acc}, ClassificationResult(acc, loss))

    def split_metrics(self, role: str, result: ClassificationResult) -> dict[str, Any]:
        """``<role>_accuracy`` and ``<role>_loss``: per-frame event classification of the valid
        seconds (background included)."""
        return {f"{role}_accuracy": result.accuracy, f"{role}_loss": result.loss}

    def store_identity(self) -> dict[str, Any]:
        return {"store": str(self.store.path), "store_fingerprint": self.store.fingerprint}

    def metrics(self, model, result) -> dict[str, Any]:
        """Samples per split, val/test classification, and the localization of the test videos
        that have a box file (kept for :meth:`write_outputs`)."""
        cfg, scfg = self.train_cfg, self.sol_cfg
        metrics: dict[str, Any] = {
            "schedule": {"batch_unit": "seconds (T = F frames)"},
            "samples": {n: len(s) for n, s in self.splits.items()},
            "sol": dataclasses.asdict(scfg),
        }
        for role in ("val", "test"):
            res = result.results.get(role)
            metrics[f"{role}_accuracy"] = None
            if res is not None:
                metrics.update(self.split_metrics(role, res))
        test = self.splits[cfg.test_split]
        boxes_root = self.pipeline.path(scfg.boxes_root)
        boxes = load_boxes(boxes_root, sorted(set(test.keys)))
        self.frames = localize_split(model, self.store, test, boxes, scfg, self.device)
        summary = sol.summarize([r.ciou for r in self.frames], [r.iou for r in self.frames], scfg.success_threshold)
        centre = sol.summarize([r.centre_ciou for r in self.frames], [r.centre_iou for r in self.frames], scfg.success_threshold)
        tag = f"{scfg.success_threshold:g}"
        metrics.update({
            f"test_ciou@{tag}": summary[f"ciou@{tag}"], f"test_iou@{tag}": summary[f"iou@{tag}"],
            "test_mean_ciou": summary["mean_ciou"], "test_mean_iou": summary["mean_iou"],
            "test_frames": summary["frames"], "test_videos_with_boxes": len(boxes), "boxes_root": str(boxes_root),
        })
        box_method = (f"centre box: {sol.CENTRE_BOX_FRACTION:g} of the frame's width and height in its centre, "
                      "scored like the head on the same frames")
        baseline: dict[str, Any] = {}
        for role in ("val", "test"):
            split = self.splits.get(getattr(cfg, f"{role}_split"))
            if split is not None and result.results.get(role) is not None:
                share, label = majority_baseline(split.labels[split.valid], self.class_names)
                baseline[f"{role}_accuracy"] = baseline_entry(share, f"majority class of the valid seconds: {label}")
        for key, value in ((f"test_ciou@{tag}", centre[f"ciou@{tag}"]), (f"test_iou@{tag}", centre[f"iou@{tag}"]),
                           ("test_mean_ciou", centre["mean_ciou"]), ("test_mean_iou", centre["mean_iou"])):
            baseline[key] = baseline_entry(value, box_method)
        metrics["baseline"] = baseline
        log.info("test localization: cIoU@%s %.4f, IoU@%s %.4f over %d annotated frames of %d videos "
                 "(centre box: %.4f, %.4f)", tag, summary[f"ciou@{tag}"], tag, summary[f"iou@{tag}"], summary["frames"],
                 len(boxes), centre[f"ciou@{tag}"], centre[f"iou@{tag}"])
        if not self.frames:
            log.warning("no annotated frame of the test split was scored (box files under %s: %d of %d test videos)",
                        boxes_root, len(boxes), len(set(test.keys)))
        return metrics

    @property
    def class_names(self) -> list[str]:
        return list(self.classes) + ["background"]

    def checkpoint_meta(self) -> dict[str, Any]:
        """Classes and how the map store was made (``features``, for avel-predict)."""
        return {"classes": self.classes, "class_names": self.class_names,
                "features": store_recipe(self.store.path, self.store.fingerprint, self.store.attrs,
                                         self.store.segments, self.pipeline)}

    @staticmethod
    def report_lines(results: list[dict[str, Any]]) -> str | None:
        """Test cIoU@t and IoU@t (mean ± std over seeds) beside the centre-box baseline."""
        from ..runs import mean_std_text

        if not results:
            return None
        keys = [k for k in results[0] if k.startswith("test_ciou@")]
        if not keys:
            return None
        tag = keys[0].split("@", 1)[1]
        base = results[0].get("baseline", {})

        def cell(key: str) -> str:
            values = [r[key] for r in results if r.get(key) is not None]
            return mean_std_text(values) if values else "n/a"

        def base_cell(key: str) -> str:
            value = (base.get(key) or {}).get("value")
            return "n/a" if value is None else f"{value:.4f}"

        frames = results[0].get("test_frames", 0)
        videos = results[0].get("test_videos_with_boxes", 0)
        n = len(results)
        return (f"test cIoU@{tag} {cell(f'test_ciou@{tag}')}, IoU@{tag} {cell(f'test_iou@{tag}')} "
                f"(centre-box baseline: cIoU@{tag} {base_cell(f'test_ciou@{tag}')}, IoU@{tag} {base_cell(f'test_iou@{tag}')}; "
                f"{frames} annotated frames of {videos} test videos{f', {n} seeds' if n > 1 else ''})")

    # -- prediction (avel-predict, render-sol) ------------------------------------------------
    prediction_maps = "sounding_object"

    @classmethod
    def open_prediction_store(cls, path, segments: int) -> FeatureStore:
        """A complete map store (:func:`open_map_store`) of ``segments`` seconds per row."""
        store = open_map_store(path)
        if store.segments != int(segments):
            raise StoreError(f"{store.path}: rows of {store.segments} seconds, the head was trained on {segments}")
        return store

    @classmethod
    def predict_windows(cls, model, store, rows, device="cpu"):
        """Each window runs as one causal sequence of its T x F frames (as the test evaluation
        runs, :func:`video_outputs`): a second's probabilities are the mean of its F frames'
        softmax, its label their argmax, its map the mean of its F frames' sounding-object maps."""
        by_row = {}
        for row, probs, maps, _ in cls.frame_outputs(model, store, sorted({int(r) for r in rows}), device):
            by_row[row] = (probs.mean(axis=1), maps.mean(axis=1))  # [T, C], [T, h, w]
        probs = np.stack([by_row[int(r)][0] for r in rows])
        maps = np.stack([by_row[int(r)][1] for r in rows])
        return probs.argmax(axis=-1), probs, maps

    @classmethod
    def frame_outputs(cls, model, store, rows, device="cpu"):
        """Per row: (probabilities [T, F, C] = softmax of the head's per-frame scores, maps
        [T, F, h, w] = its sounding-object maps, ``frame_index`` [T, F] of the store), each video
        one causal sequence (:func:`video_outputs`, :data:`PREDICT_VIDEOS` rows at a time)."""
        index = store.array("frame_index")
        for row, scores, maps in video_outputs(model, store, [int(r) for r in rows], PREDICT_VIDEOS, device):
            probs = torch.from_numpy(scores).float().softmax(dim=-1).numpy()
            yield row, probs, maps, np.asarray(index[row])

    def write_outputs(self, run_dir: Path, title: str, model, result) -> None:
        """learning_curves.png and localization_test.csv."""
        super().write_outputs(run_dir, title, model, result)
        write_frames_csv(run_dir / "localization_test.csv", self.frames)
