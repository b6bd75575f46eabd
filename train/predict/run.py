"""Run a trained event-localization head on new videos: per-second labels, events, pictures.

:func:`predict_videos` is what ``avel-predict`` runs (and what a notebook calls)::

    results = predict_videos(["clip.mp4", "folder/"], run="data/runs/avel-dmrn-supervised/seed0-...")
    results[0].labels          # one class name per second
    results[0].events          # [Event(onset=2, offset=7, label="dog", mean_probability=0.91)]

How it works, stage by stage (the two stages meet only at a feature store, as everywhere in avel):

1. **The run.** The checkpoint (``checkpoint.safetensors`` of an ``avel-train`` run) holds the
   head, its weights, the class names and ``features``: how the training store was made (its
   fingerprint, the fingerprinted fields, the full extractor configuration, T).
2. **Windows.** Each video is probed (PyAV) for its duration and cut into consecutive windows of T
   seconds (the run's T), ``start = 0, T, 2T, ...``; the last window may be partial. A trailing
   piece of a second shorter than :data:`MIN_LAST_SECOND` is not predicted.
3. **Features.** The windows become stage-1 requests, and stage 1 computes them in this process
   (:func:`extract_features`: its environment check, then :func:`extract.cache.extract_with_cache`,
   what ``avel-extract --cache`` runs, with its progress, failure rules and summary) with the
   training store's extractor configuration, into the predict store (``--store``, default
   ``<out>/features.zarr``) through the shared feature cache (``--cache-root`` > ``$AVEL_CACHE`` >
   the run's ``store.cache_root``: :func:`extract.core.settings.cache_root`), so a second head on
   the same videos decodes nothing. Each window comes back as an outcome record (done, failed with
   stage 1's reason, not extracted); an exception of stage 1 is not a per-video failure (it stops
   the prediction: :class:`PredictError` for a configuration or environment problem, anything else
   propagates). The new store's fingerprint must equal the training store's: same recipe, networks and weights, frames per segment, precision, resize rule.
   Before any video is touched (:func:`check_features_recipe`) the weights are resolved and the
   fingerprint they would give is compared with the training store's: a weights file missing here
   stops the prediction naming the file, where avel looked and where to download it; other
   weights (or settings) name the differing fields. A store imported from the public AVE files
   (``avel-extract import-h5``) records the ``ave2018`` recipe and the Keras VGG-19 / AudioSet
   VGGish weights, so a head trained on it predicts new videos whose features that recipe computes.
4. **Heads.** Each window is one sample of the head, exactly as in training: the head sees T
   seconds at a time, its temporal context (BiLSTM, self-attention) never crosses a window edge,
   and the invalid seconds of a partial last window are zero features the head sees but whose
   predictions are marked ``valid = false`` and dropped from the timeline's end.
5. **Outputs** per video under ``<out>/<video_id>/``: ``predictions.csv`` (one row per second:
   ``video_id, second, label, valid, probability, p_<class>...``), ``predictions.json`` (the same
   plus the merged events and how it was made), ``timeline.png``; for heads with spatial attention
   ``attention.npy`` (the head's own weights, [S, h, w]) and ``attention.png`` (one frame per
   second, at its middle, with the weights overlaid); ``overlay.mp4`` on request;
   ``<out>/summary.csv`` for all videos.

The run's task (registered in :mod:`train.registry`) opens the predict store and runs its head
on the windows through its prediction hooks (:meth:`train.tasks.base.Task.open_prediction_store`,
:meth:`~train.tasks.base.Task.predict_windows`); a task without them cannot be predicted
(:func:`predict_tasks`). Task ``sol`` (the STM head on a map store) runs each window as one causal
sequence of its T x F sampled frames (as the task's test evaluation), a second's probabilities are
the mean of its frames' softmax, and instead of the attention the outputs hold the sounding-object
map (``sounding_object.npy``, mean of the second's frames) and ``sounding_object.png`` with its
Otsu box, whose coordinates are in ``predictions.json``. The pictures' frames come from stage 1's
decoder (:func:`extract.decode.picture_frames`): the frames the features were computed from.

Probabilities are the softmax of the head's scores; the label of a second is the head's own
prediction rule (:meth:`train.heads.base.Head.predict`, e.g. CMBS predicts background unless its
event score passes 0.5), which is what the run's accuracy counted.

A video that cannot be predicted (missing, unreadable, no audio stream, failed extraction, its
``predictions.csv`` / ``.json`` not writable) gets a result with ``error`` set; the others are
predicted. The two prediction files are written whole or not at all (a temporary file renamed);
a picture that fails is a warning in ``outputs["warning"]``. Imports no decoder at import time.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

log = logging.getLogger(__name__)

#: video file extensions collected from a folder
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".ogv")
#: a trailing piece of the video shorter than this (seconds) is not a second of the timeline
MIN_LAST_SECOND = 0.25
SPLIT = "predict"


class PredictError(RuntimeError):
    """Prediction cannot start or its features cannot be made (all videos); the message says why
    and what to do. Per-video problems are reported in :attr:`VideoResult.error` instead."""


@dataclasses.dataclass
class Event:
    """Consecutive valid seconds with the same event label: ``onset <= t < offset`` (seconds)."""

    onset: int
    offset: int
    label: str
    mean_probability: float


@dataclasses.dataclass
class VideoResult:
    """The prediction of one video. ``seconds`` = S; ``labels`` [S] class names; ``probabilities``
    [S, C] (softmax of the head's scores); ``valid`` [S] (the second has audio and visual features);
    ``attention`` [S, h, w] spatial attention of the head when it has one; ``error`` set (and the
    rest empty) when the video could not be predicted."""

    video_id: str
    path: str
    seconds: int = 0
    labels: list[str] = dataclasses.field(default_factory=list)
    probabilities: np.ndarray | None = None
    valid: np.ndarray | None = None
    events: list[Event] = dataclasses.field(default_factory=list)
    attention: np.ndarray | None = None
    #: what ``attention`` holds: the head's spatial attention, or (task sol) the sounding-object map
    map_kind: str = "attention"
    duration: float | None = None
    windows: int = 0
    error: str | None = None
    outputs: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None

    def confidence(self) -> np.ndarray:
        """[S] probability of each second's predicted label."""
        if self.probabilities is None:
            return np.zeros(0)
        names = self._class_index()
        return np.array([self.probabilities[t, names[label]] for t, label in enumerate(self.labels)])

    def _class_index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.class_names)}

    class_names: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class LoadedRun:
    """A trained head ready to predict: the module (eval mode), the checkpoint metadata, the class
    names and the training store's recipe (``features``)."""

    head: Any
    meta: dict[str, Any]
    checkpoint: Path
    class_names: list[str]
    features: dict[str, Any]

    @property
    def segments(self) -> int:
        return int(self.features["segments"])

    @property
    def task(self) -> str:
        return str(self.meta.get("task", "avel"))

    @property
    def task_class(self):
        """The registered :class:`train.tasks.base.Task` of the run (its prediction hooks)."""
        from ..registry import get_task

        return get_task(self.task)


# ------------------------------------------------------------------------------------------
# the run


def predict_tasks() -> list[str]:
    """The registered tasks whose heads avel-predict can run on new videos: those that provide
    the prediction hooks of :class:`train.tasks.base.Task` (:meth:`~train.tasks.base.Task.can_predict`)."""
    from ..registry import TASKS, discover

    discover()
    return sorted(name for name, cls in TASKS.items() if cls.can_predict())


def load_run(run: str | os.PathLike | None = None, checkpoint: str | os.PathLike | None = None,
             device: str = "cpu") -> LoadedRun:
    """The head of an ``avel-train`` run directory (its ``checkpoint.safetensors``) or of a
    checkpoint file. Refuses checkpoints that cannot predict new videos (another task, or written
    before checkpoints recorded their features)."""
    from ..checkpoint import CheckpointError, build_head

    if (run is None) == (checkpoint is None):
        raise PredictError("give a run directory (--run) or a checkpoint file (--checkpoint), one of them")
    path = Path(checkpoint) if checkpoint is not None else Path(run) / "checkpoint.safetensors"
    if run is not None and not Path(run).is_dir():
        raise PredictError(f"{run}: no such run directory (an avel-train run folder holds checkpoint.safetensors)")
    try:
        head, meta = build_head(path, device)
    except CheckpointError as exc:
        raise PredictError(str(exc)) from None
    tasks = predict_tasks()
    if meta.get("task", "avel") not in tasks:
        raise PredictError(f"{path}: a run of task {meta.get('task')!r}; avel-predict runs the heads of the tasks "
                           f"that provide prediction hooks (train.tasks.base.Task.predict_windows): {', '.join(tasks)}")
    features = meta.get("features")
    if not features or not features.get("extractor") or not features.get("fingerprint"):
        raise PredictError(f"{path}: the checkpoint does not record how its training features were made "
                           "(written by an older avel-train); train the head again to predict new videos")
    names = list(meta.get("class_names") or [])
    if len(names) != int(meta["num_classes"]):
        raise PredictError(f"{path}: {len(names)} class names for {meta['num_classes']} classes")
    return LoadedRun(head, meta, path, names, features)


# ------------------------------------------------------------------------------------------
# videos and windows


def collect_videos(inputs: Sequence[str | os.PathLike], manifest: str | os.PathLike | None = None,
                   video_root: str | os.PathLike | None = None) -> list[Path]:
    """Video paths from files, folders (their video files, sorted, not recursive) and a manifest
    (a CSV with a ``path`` column or one path per line; relative paths are relative to
    ``video_root``, default the manifest's folder).
    Paths that do not exist are kept: they become per-video errors."""
    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in VIDEO_EXTENSIONS)
            if not found:
                log.warning("%s: no video files (%s)", p, ", ".join(VIDEO_EXTENSIONS))
            paths.extend(found)
        else:
            paths.append(p)
    if manifest is not None:
        paths.extend(read_video_list(manifest, video_root))
    seen, unique = set(), []
    for p in paths:
        key = str(p.resolve()) if p.exists() else str(p)
        if key not in seen:
            seen.add(key)
            unique.append(p)
    if not unique:
        raise PredictError("no videos given (pass files, folders or --manifest)")
    return unique


def read_video_list(path: str | os.PathLike, video_root: str | os.PathLike | None = None) -> list[Path]:
    """Paths of a ``--manifest``: a CSV with a ``path`` column (avel manifests are such files),
    or plain text with one path per line; relative paths are relative to ``video_root`` (default:
    the file's folder)."""
    path = Path(path)
    if not path.is_file():
        raise PredictError(f"{path}: manifest not found")
    text = path.read_text().splitlines()
    base = Path(video_root) if video_root is not None else path.resolve().parent
    first = next((line for line in text if line.strip()), "")
    if "," in first and "path" in [c.strip() for c in first.split(",")]:
        rows = csv.DictReader(text)
        items = [row["path"].strip() for row in rows if (row.get("path") or "").strip()]
    else:
        items = [line.strip() for line in text if line.strip() and not line.lstrip().startswith("#")]
    return [Path(i) if Path(i).is_absolute() else base / i for i in items]


def video_ids(paths: Sequence[Path]) -> list[str]:
    """A readable, unique id per video: the file stem, ``stem-2``, ``stem-3`` ... on repeats."""
    ids, used = [], set()
    for p in paths:
        stem = p.stem or "video"
        vid, k = stem, 2
        while vid in used:
            vid, k = f"{stem}-{k}", k + 1
        used.add(vid)
        ids.append(vid)
    return ids


def probe_duration(path: Path) -> float:
    """Seconds of a video (the longest of its container, video and audio streams), read with
    PyAV without decoding. A file whose header gives no duration (Matroska/WebM written live, e.g.
    by a browser) is measured from its packets instead (:func:`_packet_duration`: one pass over
    the file, nothing decoded). Raises ValueError naming the file when it is missing or unreadable."""
    if not path.exists():
        raise ValueError(f"{path}: file not found")
    if not path.is_file() or path.stat().st_size == 0:
        raise ValueError(f"{path}: not a file, or empty")
    import av

    try:
        with av.open(str(path)) as container:
            has_video = bool(container.streams.video)
            candidates = []
            if container.duration:
                candidates.append(container.duration / 1_000_000)
            for stream in list(container.streams.video) + list(container.streams.audio):
                if stream.duration and stream.time_base:
                    candidates.append(float(stream.duration * stream.time_base))
            if has_video and not any(c > 0 for c in candidates):
                candidates.append(_packet_duration(container))
    except Exception as exc:  # noqa: BLE001 - PyAV raises many error types; the video is reported
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ValueError(f"{path}: cannot be read as a video ({reason}); is the file complete?") from None
    if not has_video:
        raise ValueError(f"{path}: no video stream")
    if not candidates or max(candidates) <= 0:
        raise ValueError(f"{path}: the container gives no duration")
    return max(candidates)


def _packet_duration(container) -> float:
    """Seconds from the first to the end of the last packet of any video or audio stream
    (presentation times; a packet without a duration ends where it starts)."""
    streams = list(container.streams.video) + list(container.streams.audio)
    first: dict[int, float] = {}
    last: dict[int, float] = {}
    for packet in container.demux(streams):
        if packet.size == 0 or packet.pts is None or packet.time_base is None:
            continue
        start = float(packet.pts * packet.time_base)
        end = start + float((packet.duration or 0) * packet.time_base)
        index = packet.stream.index
        first[index] = min(first.get(index, start), start)
        last[index] = max(last.get(index, end), end)
    return max((last[i] - first[i] for i in last), default=0.0)


def window_starts(duration: float, segments: int) -> list[int]:
    """Starts (s) of the consecutive T-second windows covering ``duration`` (the last may be
    partial; a trailing piece shorter than :data:`MIN_LAST_SECOND` is left out)."""
    seconds = max(1, math.ceil(duration - MIN_LAST_SECOND))
    return list(range(0, seconds, segments))


def window_key(video_id: str, start: int, segments: int) -> str:
    """Store row key of a window (:func:`extract.core.manifest.feature_key`)."""
    from extract.core.manifest import feature_key

    return feature_key(video_id, float(start), float(segments))


# ------------------------------------------------------------------------------------------
# features (stage 1, in this process)


def check_features_recipe(run: LoadedRun, device: str | None = None) -> None:
    """Refuse, before any work, a run whose training features cannot be computed here: resolve
    the weights of the training store's extractor configuration (a missing file raises with the
    file's name, where avel looked and where to download it) and compare the fingerprint they give
    (the precision that runs on ``device``, default the configuration's) with the training
    store's, naming the differing fields."""
    from extract.core.devices import resolve_device
    from extract.extractors import extractor_identity
    from extract.provenance import effective_config, same_feature_set, store_attrs
    from extract.core.settings import ConfigError, load_pipeline
    from extract.core.store import differing_fields
    from extract.weights import WeightsUnavailable

    recipe = dict(run.features["extractor"])
    if device:
        recipe["device"] = device
    try:
        cfg = load_pipeline(None, {"extract": recipe}, search=False).extract
    except ConfigError as exc:
        raise PredictError(f"{run.checkpoint}: the training store's extractor configuration is not valid in this avel: "
                           f"{exc}") from None
    try:
        identities = extractor_identity(cfg)
    except (WeightsUnavailable, ValueError) as exc:
        raise PredictError("the run's features cannot be computed here, nothing was predicted: "
                           + " ".join(str(exc).split())) from None
    try:
        where = resolve_device(cfg.device)
    except Exception as exc:  # noqa: BLE001 - e.g. cuda asked on a machine without it
        raise PredictError(f"extract.device={cfg.device!r} is not usable here ({exc}); pass --extract-device cpu") from None
    attrs = store_attrs(effective_config(cfg, where), identities)
    want = run.features["fingerprint"]
    if not same_feature_set(want, run.features.get("fingerprint_fields"), attrs["fingerprint"]):
        fields = differing_fields(run.features.get("fingerprint_fields") or {}, attrs["fingerprint_fields"])
        raise PredictError(
            f"the features this machine would compute for the run are not the ones its head was trained on (fingerprint "
            f"{attrs['fingerprint'][:12]} vs the training store's {want[:12]}); differing: "
            + ("; ".join(fields[:8]) if fields else "unknown fields")
            + ". Make the same weights files and precision available here (see docs/predict.md); nothing was predicted")


def predict_pipeline(recipe: dict[str, Any], store: Path, cache_root: Path | None, device: str | None) -> dict[str, Any]:
    """The configuration of the predict extraction (``pipeline.yaml`` sections): the training
    store's extractor configuration (device replaced when given: not part of the features), the
    predict store and the cache."""
    extract = dict(recipe["extractor"])
    if device:
        extract["device"] = device
    doc: dict[str, Any] = {"extract": extract, "store": {"path": str(store)}}
    if cache_root is not None:
        doc["store"]["cache_root"] = str(cache_root)
    return doc


def feature_cache_root(run: LoadedRun, explicit: str | os.PathLike | None, work: Path) -> Path:
    """The feature cache of a prediction, by the one precedence of
    :func:`extract.core.settings.cache_root`: ``explicit`` (``--cache-root``) > ``$AVEL_CACHE`` >
    the run's own configuration (:func:`train.runs.run_pipeline`: its ``store.cache_root``,
    relative to the folder the training started from). A checkpoint outside a run folder (or a
    run whose config.yaml this avel cannot read) falls back to the folder its checkpoint recorded
    (``features.cache_root``), else ``work/cache``."""
    from extract.core.settings import ConfigError, cache_root

    from ..runs import run_pipeline

    try:
        return cache_root(run_pipeline(run.checkpoint.resolve().parent), explicit)
    except ConfigError as exc:
        log.debug("the run's configuration gives no feature cache (%s); using the checkpoint's record", exc)
    chosen = cache_root(None, explicit)
    recorded = run.features.get("cache_root")
    return chosen if chosen is not None else Path(recorded) if recorded else work / "cache"


def extract_features(run: LoadedRun, plans: Sequence["_Plan"], work: Path, store: Path, *, cache: bool = True,
                     device: str | None = None, progress: bool = True, cache_root: str | os.PathLike | None = None
                     ) -> dict[str, Any]:
    """Compute the features of the windows of ``plans`` into ``store`` with the training store's
    extractor configuration, in this process: stage 1's environment check
    (:func:`extract.preflight.require_environment`), then its extraction through the shared
    feature cache (:func:`extract.cache.extract_with_cache`, what ``avel-extract --cache`` runs),
    or without the cache (``cache=False``) :func:`extract.run.run_extraction`. Behind another run
    computing the same videos it waits, saying for whom. Progress (rate and ETA on a terminal,
    log lines otherwise) and the summary are stage 1's own.

    Returns ``{window key: extract.run.VideoOutcome}`` (done / failed with the reason / missing),
    one per window. Raises :class:`PredictError` when the extraction cannot run (environment,
    configuration, store, a lock held by a dead-end writer) or an environment error stopped it
    (nothing is then reported as a per-video failure); any other exception is a bug and propagates."""
    import yaml

    from extract.cache import extract_with_cache
    from extract.core.lock import StoreLocked
    from extract.core.manifest import ManifestError
    from extract.core.settings import ConfigError, load_pipeline
    from extract.core.store import StoreError
    from extract.decode import VideoRequest
    from extract.preflight import PreflightError, require_environment
    from extract.run import run_extraction
    from extract.weights import WeightsUnavailable

    work.mkdir(parents=True, exist_ok=True)
    requests = [VideoRequest(window_key(p.video_id, start, run.segments), str(p.path.resolve()), float(start),
                             float(run.segments))
                for p in plans for start in p.starts]
    root = feature_cache_root(run, cache_root, work) if cache else None
    doc = predict_pipeline(run.features, store, root, device)
    config = work / "pipeline.yaml"  # the resolved configuration of the extraction, for the record
    config.write_text("# written by avel-predict: the training store's extractor configuration\n"
                      + yaml.safe_dump(doc, sort_keys=False))
    try:
        pipeline = load_pipeline(None, doc, search=False)
        log.info("features of %d windows with the training store's extractor configuration (%s)%s", len(requests),
                 config, f", through the feature cache {root}" if cache else "")
        require_environment(pipeline.extract, pipeline.extract.device, build_networks=False)
        if cache:
            summary = extract_with_cache(pipeline, requests, store_path=store, root=root, progress=progress, wait=True)
        else:
            summary = run_extraction(pipeline, requests, store_path=store, progress=progress, wait=True)
    except (ConfigError, ManifestError, StoreError, StoreLocked, PreflightError, WeightsUnavailable) as exc:
        raise PredictError("computing the features with the run's extractor configuration failed; nothing was "
                           f"predicted: {exc}") from None
    log.info("%s", summary.text())
    if summary.systemic:
        raise PredictError("an environment error stopped the feature extraction; nothing was predicted: "
                           f"{summary.systemic}")
    return summary.outcomes


def extraction_error(plan: "_Plan", outcomes: dict[str, Any], segments: int) -> str | None:
    """The error of a video one of whose windows the extraction failed (its reason, naming the
    file) or did not extract; None when every window is done."""
    for start in plan.starts:
        outcome = outcomes.get(window_key(plan.video_id, start, segments))
        if outcome is None or outcome.status == "missing":
            return f"{plan.path}: the features of its window at {start} s were not extracted"
        if not outcome.ok:
            return f"{plan.path}: feature extraction failed: {outcome.reason}"
    return None


def check_features(store_path: Path, run: LoadedRun) -> Any:
    """Open the predict store; refuse it unless its fingerprint is the training store's (naming
    the fields that differ)."""
    from extract.core.store import StoreError, differing_fields

    try:
        store = run.task_class.open_prediction_store(store_path, run.segments)
    except StoreError as exc:
        raise PredictError(f"the predict store cannot be read: {exc}") from None
    from extract.provenance import same_feature_set

    want = run.features["fingerprint"]
    if not same_feature_set(want, run.features.get("fingerprint_fields"), store.fingerprint):
        fields = differing_fields(run.features.get("fingerprint_fields") or {}, store.attrs.get("fingerprint_fields") or {})
        raise PredictError(
            f"{store_path}: these features are not the ones the head was trained on (fingerprint "
            f"{store.fingerprint[:12]} vs the training store's {want[:12]}); differing: "
            + ("; ".join(fields) if fields else "unknown fields")
            + ". Make the same networks/weights and precision available here (see docs/predict.md)")
    return store


# ------------------------------------------------------------------------------------------
# prediction


@dataclasses.dataclass
class _Plan:
    video_id: str
    path: Path
    duration: float | None = None
    starts: list[int] = dataclasses.field(default_factory=list)
    error: str | None = None


def merge_events(labels: Sequence[str], probs: np.ndarray, valid: np.ndarray, class_names: Sequence[str],
                 background: str) -> list[Event]:
    """Runs of consecutive valid seconds with the same non-background label, with the mean
    probability of that label over the run."""
    index = {n: i for i, n in enumerate(class_names)}
    events: list[Event] = []
    t = 0
    while t < len(labels):
        if not valid[t] or labels[t] == background:
            t += 1
            continue
        end = t
        while end + 1 < len(labels) and valid[end + 1] and labels[end + 1] == labels[t]:
            end += 1
        mean = float(np.mean(probs[t:end + 1, index[labels[t]]]))
        events.append(Event(onset=t, offset=end + 1, label=labels[t], mean_probability=mean))
        t = end + 1
    return events


def predict_from_store(run: LoadedRun, store, plans: Sequence[_Plan], device: str = "cpu") -> list[VideoResult]:
    """Per-video results from the rows of the predict store (windows in order, stitched)."""
    from extract.core.store import STATUS_DONE

    task = run.task_class
    ids = {str(k): i for i, k in enumerate(store.ids.tolist())}
    status = np.asarray(store.array("status")[:])
    reasons = store.array("reason")
    T = run.segments
    names = run.class_names
    results = []
    for plan in plans:
        res = VideoResult(plan.video_id, str(plan.path), duration=plan.duration, windows=len(plan.starts),
                          class_names=names)
        results.append(res)
        if plan.error:
            res.error = plan.error
            continue
        keys = [window_key(plan.video_id, s, T) for s in plan.starts]
        missing = [k for k in keys if k not in ids]
        if missing:
            res.error = f"{plan.path}: no features were written for window {missing[0]}"
            continue
        rows = np.array([ids[k] for k in keys], dtype=np.int64)
        bad = [int(r) for r in rows if int(status[r]) != STATUS_DONE]
        if bad:
            res.error = f"{plan.path}: feature extraction failed: {str(reasons[bad[0]])}"
            continue
        valid = store.read("valid", rows).astype(bool).reshape(-1)
        if not valid.any():
            note = str(reasons[int(rows[0])]) or "no second has both audio and visual features"
            res.error = (f"{plan.path}: nothing to predict: {note}; the head needs audio and visual features "
                         "for each second")
            continue
        label_ids, probs, attention = task.predict_windows(run.head, store, rows, device)
        res.map_kind = task.prediction_maps
        seconds = int(np.flatnonzero(valid)[-1]) + 1
        res.seconds = seconds
        res.valid = valid[:seconds]
        res.labels = [names[int(i)] for i in label_ids.reshape(-1)[:seconds]]
        res.probabilities = probs.reshape(-1, probs.shape[-1])[:seconds]
        if attention is not None:
            res.attention = attention.reshape(-1, *attention.shape[2:])[:seconds]
        res.events = merge_events(res.labels, res.probabilities, res.valid, names, names[-1])
    return results


# ------------------------------------------------------------------------------------------
# outputs


@contextlib.contextmanager
def _atomic(path: Path, newline: str | None = None):
    """A text file written whole or not at all: into ``path.tmp``, renamed over ``path`` at the end."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", newline=newline) as fh:
            yield fh
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_video_outputs(res: VideoResult, out: Path, run: LoadedRun, *, plots: bool = True,
                        overlay_video: bool = False) -> None:
    """predictions.csv / .json, timeline.png, attention.png (heads with attention), overlay.mp4
    (``overlay_video``) under ``out / video_id``; their paths go to ``res.outputs``."""
    folder = out / res.video_id
    folder.mkdir(parents=True, exist_ok=True)
    names = run.class_names
    conf = res.confidence()
    csv_path = folder / "predictions.csv"
    with _atomic(csv_path, newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["video_id", "second", "label", "valid", "probability"] + [f"p_{n}" for n in names])
        for t in range(res.seconds):
            writer.writerow([res.video_id, t, res.labels[t], int(bool(res.valid[t])), f"{conf[t]:.6f}"]
                            + [f"{p:.6f}" for p in res.probabilities[t]])
    res.outputs["csv"] = str(csv_path)
    doc = {
        "video_id": res.video_id, "path": res.path, "duration": res.duration, "seconds": res.seconds,
        "windows": res.windows, "segments_per_window": run.segments, "class_names": names,
        "labels": res.labels, "valid": [bool(v) for v in res.valid],
        "probabilities": np.round(res.probabilities, 6).tolist(),
        "events": [dataclasses.asdict(e) for e in res.events],
        "head": run.meta.get("head"), "task": run.task, "setting": run.meta.get("setting"),
        "checkpoint": str(run.checkpoint),
        "features_fingerprint": run.features.get("fingerprint"),
    }
    json_path = folder / "predictions.json"
    with _atomic(json_path) as fh:
        fh.write(json.dumps(doc, indent=1))
    res.outputs["json"] = str(json_path)
    sol_maps = res.map_kind == "sounding_object"
    map_name = "sounding_object" if sol_maps else "attention"
    if res.attention is not None:
        np.save(folder / f"{map_name}.npy", res.attention.astype(np.float32))
        res.outputs[f"{map_name}_values"] = str(folder / f"{map_name}.npy")
    if not plots and not overlay_video:
        return
    from . import plots as pp

    title = f"{res.video_id} — {run.meta.get('head')} ({run.meta.get('setting')})"
    if plots:
        res.outputs["timeline"] = str(pp.plot_timeline(res.labels, res.probabilities, names, res.valid,
                                                       [dataclasses.asdict(e) for e in res.events],
                                                       folder / "timeline.png", title, background=names[-1]))
        if res.attention is not None:
            try:
                _write_strips(res, folder, map_name, sol_maps, conf, title, doc, json_path)
            except ValueError as exc:
                log.warning("%s: no %s strip: %s", res.video_id, map_name, exc)
    if overlay_video:
        res.outputs["overlay"] = str(pp.write_overlay_video(res.path, folder / "overlay.mp4", res.attention,
                                                            res.labels, conf, class_names=names,
                                                            background=names[-1]))


def strip_name(map_name: str, lo: int, pages: int) -> str:
    """File of the strip page starting at second ``lo``: ``attention.png`` when the video has one
    page, else ``attention-000m.png``, ``attention-001m.png``, ... (the page's first minute)."""
    from .plots import STRIP_SECONDS

    if pages == 1:
        return f"{map_name}.png"
    return f"{map_name}-{lo // 60:03d}m.png" if STRIP_SECONDS == 60 else f"{map_name}-{lo:05d}s.png"


def _write_strips(res: VideoResult, folder: Path, map_name: str, sol_maps: bool, conf: np.ndarray, title: str,
                  doc: dict[str, Any], json_path: Path) -> None:
    """The attention (or sounding-object) strip in pages of :data:`train.predict.plots.STRIP_SECONDS`
    seconds: each page reads only its own frames (one per second, at its middle) and draws at
    most that many panels, so a long video never holds all its frames or builds thousands of axes
    at once. ``res.outputs[map_name]`` is the first page; with several pages
    ``res.outputs[map_name + "_pages"]`` is the glob of them all."""
    from . import plots as pp

    pages = pp.strip_pages(res.seconds)
    boxes: list = []
    first = None
    for lo, hi in pages:
        frames = pp.read_frames(res.path, [t + 0.5 for t in range(lo, hi)])
        path = folder / strip_name(map_name, lo, len(pages))
        page_title = title if len(pages) == 1 else f"{title}  [{lo}-{hi} s]"
        if sol_maps:
            drawn = pp.plot_sol_strip(frames, res.attention[lo:hi], res.labels[lo:hi], conf[lo:hi], path, page_title,
                                      start=lo)
            boxes.extend(None if np.isnan(b).any() else [round(float(x), 1) for x in b] for b in drawn["boxes"])
        else:
            drawn = pp.plot_attention_strip(frames, res.attention[lo:hi], res.labels[lo:hi], conf[lo:hi], path,
                                            page_title, start=lo)
        first = first or drawn["path"]
        del frames, drawn
    res.outputs[map_name] = str(first)
    if len(pages) > 1:
        res.outputs[f"{map_name}_pages"] = str(folder / f"{map_name}-*.png")
    if sol_maps:
        doc["sounding_object_boxes"] = boxes  # per second, x0 y0 x1 y1 on the 224 x 224 frame
        with _atomic(json_path) as fh:
            fh.write(json.dumps(doc, indent=1))


SUMMARY_COLUMNS = ("video_id", "status", "seconds", "events", "main_event", "event_seconds", "path", "error")


def summary_rows(results: Sequence[VideoResult]) -> list[dict[str, Any]]:
    """One row per video: status, length, events, the event class covering most seconds."""
    rows = []
    for r in results:
        if r.ok:
            by_label: dict[str, int] = {}
            for e in r.events:
                by_label[e.label] = by_label.get(e.label, 0) + e.offset - e.onset
            main = max(by_label, key=lambda k: (by_label[k], k)) if by_label else ""
            rows.append({"video_id": r.video_id, "status": "ok", "seconds": r.seconds, "events": len(r.events),
                         "main_event": main, "event_seconds": sum(by_label.values()), "path": r.path, "error": ""})
        else:
            rows.append({"video_id": r.video_id, "status": "error", "seconds": "", "events": "", "main_event": "",
                         "event_seconds": "", "path": r.path, "error": r.error})
    return rows


def write_summary(results: Sequence[VideoResult], out: Path) -> Path:
    path = out / "summary.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=SUMMARY_COLUMNS)
        writer.writeheader()
        writer.writerows(summary_rows(results))
    return path


def summary_text(results: Sequence[VideoResult]) -> str:
    """The table avel-predict prints: one line per video, then the counts."""
    rows = summary_rows(results)
    width = max([8] + [len(r["video_id"]) for r in rows])
    lines = [f"{'video':<{width}}  {'seconds':>7}  {'events':>6}  main event (seconds)"]
    for r in rows:
        if r["status"] == "ok":
            main = f"{r['main_event']} ({r['event_seconds']})" if r["main_event"] else "-"
            lines.append(f"{r['video_id']:<{width}}  {r['seconds']:>7}  {r['events']:>6}  {main}")
        else:
            lines.append(f"{r['video_id']:<{width}}  {'-':>7}  {'-':>6}  ERROR: {r['error']}")
    ok = sum(r["status"] == "ok" for r in rows)
    lines.append(f"{ok} of {len(rows)} videos predicted" + (f", {len(rows) - ok} failed" if ok < len(rows) else ""))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# the whole thing


def default_out(run: LoadedRun) -> Path:
    """``<run dir>/predict`` (the checkpoint's folder)."""
    return run.checkpoint.resolve().parent / "predict"


def predict_videos(
    videos: Iterable[str | os.PathLike] = (),
    *,
    run: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    manifest: str | os.PathLike | None = None,
    video_root: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    store: str | os.PathLike | None = None,
    cache: bool = True,
    cache_root: str | os.PathLike | None = None,
    device: str = "cpu",
    extract_device: str | None = None,
    plots: bool = True,
    overlay_video: bool = False,
    progress: bool = True,
) -> list[VideoResult]:
    """Predict every video of ``videos`` (files or folders) and ``manifest`` with the head of
    ``run`` (a run directory) or ``checkpoint``; write the outputs under ``out`` (default
    ``<run>/predict``; manifest paths are relative to ``video_root``, default its folder) and return one :class:`VideoResult` per video, in input order.

    ``store``: the predict feature store (default ``<out>/features.zarr``); ``cache``: go through
    the shared feature cache (``cache_root``, default: the training pipeline's, ``$AVEL_CACHE``
    overrides); ``device``: where the head runs; ``extract_device``: where the networks of the
    extraction run (default: the training store's setting). Raises :class:`PredictError` when
    nothing can be predicted (bad run, features that cannot be made as in training)."""
    loaded = load_run(run, checkpoint, device)
    check_features_recipe(loaded, extract_device)
    paths = collect_videos(list(videos), manifest, video_root)
    out = Path(out) if out is not None else default_out(loaded)
    out.mkdir(parents=True, exist_ok=True)
    store_path = Path(store) if store is not None else out / "features.zarr"
    plans = []
    for vid, path in zip(video_ids(paths), paths):
        plan = _Plan(vid, path)
        try:
            plan.duration = probe_duration(path)
            plan.starts = window_starts(plan.duration, loaded.segments)
        except ValueError as exc:
            plan.error = str(exc)
        plans.append(plan)
    todo = [p for p in plans if p.error is None]
    log.info("%d videos (%d windows of %d s); %d cannot be read", len(plans), sum(len(p.starts) for p in todo),
             loaded.segments, len(plans) - len(todo))
    if todo:
        outcomes = extract_features(loaded, todo, out / "extract", store_path.resolve(), cache=cache,
                                    device=extract_device, progress=progress, cache_root=cache_root)
        for plan in todo:
            plan.error = extraction_error(plan, outcomes, loaded.segments)
        features = check_features(store_path, loaded)
        results = predict_from_store(loaded, features, plans, device)
    else:
        results = [VideoResult(p.video_id, str(p.path), error=p.error, class_names=loaded.class_names) for p in plans]
    for res in results:
        if res.ok:
            try:
                write_video_outputs(res, out, loaded, plots=plots, overlay_video=overlay_video)
            except Exception as exc:  # noqa: BLE001 - one video's outputs never stop the others
                if "csv" in res.outputs and "json" in res.outputs:  # the predictions are written: pictures failed
                    log.warning("%s: outputs incomplete: %s: %s", res.video_id, type(exc).__name__, exc)
                    res.outputs["warning"] = f"{type(exc).__name__}: {exc}"
                else:
                    res.error = (f"{res.path}: the predictions could not be written to {out / res.video_id}: "
                                 f"{type(exc).__name__}: {exc}")
                    log.error("%s", res.error)
    write_summary(results, out)
    return results
