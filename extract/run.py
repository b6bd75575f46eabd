"""The extraction runner behind ``avel-extract``: manifests -> decode workers -> networks -> store.

How a run goes:

1. The split(s) (``--split train``, ``--split train,val``, ``--split all``) or ``--manifest`` give
   the video windows to extract: one per distinct feature key (:meth:`Manifest.videos`).
2. The extractors are built (weights loaded; missing pretrained weights stop the run here, before
   the store is touched). The store (``store.path``) is created if absent (atomically: built under
   a temporary name, then renamed), then locked (:mod:`extract.lock`: a second ``avel-extract``
   on the same store is refused with the holder's pid, host and start time). An existing store
   must have the same **fingerprint** (a hash of everything that changes the numbers: extractor
   identities with weights sha256 or "random", segments, frames per segment, image size and
   resize, precision, VGGish ReLU/PCA, schema version; not workers, batch sizes, device or shard
   layout); otherwise the run is refused with the differing fields named. Keys new to the store
   are appended as new rows (only this driver process resizes arrays or writes attributes).
3. Work unit = one store **shard** (rows ``k*S .. k*S+S-1``, ``store.rows_per_shard``): a shard is
   skipped when all its requested rows are done or failed, otherwise all its requested rows are
   decoded and computed again, together, and the shard is written whole
   (:meth:`FeatureStore.write_shard`, status last). Each shard has exactly one writer and the
   batches a video is computed in are always the same, so a run that is killed at any point and
   started again ends with a store identical, bit for bit, to an uninterrupted run's.
4. Decode worker processes (:class:`extract.decode.DecodePool`, ``extract.decode_workers``, default
   all cores) run ahead of the networks through a bounded queue; a decode that takes longer than
   ``extract.decode_timeout_s`` is killed and its video marked failed. The main process runs the
   extractors on all decoded videos of a shard at once (frames batched across videos).
5. Failures (missing/corrupt/unreadable files, timeouts, compute errors) never stop the run: the
   row gets status ``failed``, the reason goes to the ``reason`` array and to
   ``<store>/logs/failures.jsonl``. A progress bar shows videos/s and the ETA; the run ends with a summary, and the exit
   code is non-zero only when some requested video is failed.

**The ``valid`` flags.** ``valid[t]`` is true when segment t has both modalities: the video covers
it (at least half of its sampled frame times lie inside the video stream and inside the manifest
window) AND the audio covers its VGGish patch (the 16 kHz waveform reaches sample
``16000 t + 15600``, i.e. the first 0.975 s of the second). In general it is the AND of every
configured extractor's own validity (``vgg19``: video, ``vggish``: audio). Features of invalid
segments are zeros. A video without an audio stream is extracted (status done, its visual features
stored, the note "no audio stream" in ``reason``) but none of its segments is valid. Rows of
failed videos are all zeros and all invalid.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import logging
import os
import platform
import queue
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .decode import Failure, VideoRequest, decode_video, warm_up
from .settings import ConfigError, fingerprint, to_dict
from .store import (
    SCHEMA_VERSION,
    STATUS_DONE,
    STATUS_FAILED,
    STATUS_MISSING,
    ArraySpec,
    FeatureStore,
    StoreError,
    check_arrays,
    core_specs,
    create_store,
    open_store,
)

log = logging.getLogger(__name__)

__all__ = [
    "RunSummary",
    "resolve_splits",
    "collect_requests",
    "requests_from_manifest",
    "run_extraction",
    "run_extraction_cli",
    "distinct_requests",
    "open_run_store",
    "plan_shards",
    "decode_inputs",
    "finish_shard",
    "store_fingerprint_fields",
    "package_versions",
    "FAILURES_FILE",
]

#: failure log, one JSON object per line, under ``<store>/logs/``
FAILURES_FILE = "failures.jsonl"
#: packages whose versions are recorded in the store (distribution name -> label)
VERSIONED = {"torch": "torch", "torchvision": "torchvision", "decord2": "decord", "zarr": "zarr",
             "numpy": "numpy", "librosa": "librosa", "avel": "avel"}


# ------------------------------------------------------------------------------------------
# what to extract


def resolve_splits(pipeline, split: str) -> list[str]:
    """``"train"``, ``"train,val"`` or ``"all"`` (every configured split) -> split names."""
    configured = list(pipeline.data.splits)
    if split.strip() == "all":
        if not configured:
            raise ConfigError("--split all: no splits are configured under data.splits in pipeline.yaml")
        return configured
    names = [s.strip() for s in split.split(",") if s.strip()]
    if not names:
        raise ConfigError(f"--split {split!r}: give a split name, a comma list or 'all'")
    for name in names:
        pipeline.split(name)  # ConfigError naming the known splits
    return names


def requests_from_manifest(manifest_path: str | os.PathLike, video_root: str | os.PathLike | None) -> list[VideoRequest]:
    """One :class:`VideoRequest` per distinct feature key of a manifest; paths resolved against
    ``video_root`` (default: the manifest's folder)."""
    from .manifest import read_manifest

    manifest = read_manifest(manifest_path)
    root = Path(video_root) if video_root else Path(manifest_path).parent
    out = []
    for sample in manifest.videos():
        path = Path(os.path.expanduser(sample.path))
        out.append(VideoRequest(sample.key, str(path if path.is_absolute() else root / path), sample.start, sample.duration))
    return out


def collect_requests(pipeline, split: str | None = None, manifest: str | None = None,
                     video_root: str | None = None) -> list[VideoRequest]:
    """The video windows of ``--split`` (comma list / all) or ``--manifest``, distinct keys in order."""
    sources: list[tuple[Path, Path | None]] = []
    if manifest:
        sources.append((Path(manifest), Path(video_root) if video_root else None))
    if split:
        for name in resolve_splits(pipeline, split):
            cfg = pipeline.split(name)
            if not cfg.manifest:
                raise ConfigError(f"data.splits.{name}.manifest is empty; set it in pipeline.yaml")
            root = video_root or (pipeline.path(cfg.video_root) if cfg.video_root else None)
            sources.append((pipeline.path(cfg.manifest), Path(root) if root else None))
    if not sources:
        raise ConfigError("nothing to extract: give --split NAME or --manifest FILE")
    seen: dict[str, VideoRequest] = {}
    for path, root in sources:
        for request in requests_from_manifest(path, root):
            first = seen.setdefault(request.key, request)
            if first.path != request.path:
                log.warning("%s: key %r also comes from %s; keeping %s", path, request.key, request.path, first.path)
    return list(seen.values())


# ------------------------------------------------------------------------------------------
# store identity


def package_versions() -> dict[str, str]:
    """Versions of python and the packages that make the numbers (``"absent"`` if not installed)."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist, label in VERSIONED.items():
        try:
            out[label] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[label] = _source_version() if label == "avel" else "absent"
    return out


def _source_version() -> str:
    """avel's version from setup.cfg when running from a source checkout (not installed)."""
    import configparser

    setup_cfg = Path(__file__).resolve().parents[1] / "setup.cfg"
    parser = configparser.ConfigParser()
    try:
        parser.read(setup_cfg)
        return f"{parser['metadata']['version']} (source)"
    except (KeyError, configparser.Error):
        return "absent"


def store_fingerprint_fields(cfg, identities: dict[str, Any]) -> dict[str, Any]:
    """What the store fingerprint hashes: everything that changes the numbers, nothing else."""
    return {
        "schema_version": SCHEMA_VERSION,
        "segments": cfg.segments,
        "frames_per_segment": cfg.frames_per_segment,
        "image_size": cfg.image_size,
        "resize": cfg.resize,
        "precision": cfg.precision,
        "vggish_relu": cfg.vggish_relu,
        "vggish_pca": cfg.vggish_pca,
        "extractors": identities,
    }


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: obj}


def differing_fields(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two fingerprint-field dicts, as ``key: old -> new``."""
    a, b = _flatten(json.loads(json.dumps(old))), _flatten(json.loads(json.dumps(new)))
    return [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def store_attrs(cfg, identities: dict[str, Any]) -> dict[str, Any]:
    fields = store_fingerprint_fields(cfg, identities)
    return {
        "extractor": to_dict(cfg),
        "fingerprint": fingerprint(fields),
        "fingerprint_fields": fields,
        "extractors": identities,
        "weights": {name: ident.get("weights") for name, ident in identities.items()},
        "versions": package_versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


# ------------------------------------------------------------------------------------------
# store preparation (driver only)


def ensure_store(path: Path, keys: Sequence[str], segments: int, specs: Sequence[ArraySpec],
                 attrs: dict[str, Any], store_cfg) -> bool:
    """Create the store at ``path`` if absent (built under a temporary name, then renamed, so a
    concurrent run never sees half a store). Returns True when this call created it."""
    if path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.creating-{uuid.uuid4().hex[:8]}"
    create_store(tmp, keys, segments, specs, attrs, rows_per_shard=store_cfg.rows_per_shard,
                 compression_level=store_cfg.compression_level)
    try:
        os.rename(tmp, path)
    except OSError:  # somebody else created it meanwhile: use theirs
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    return True


def check_identity(store: FeatureStore, attrs: dict[str, Any], segments: int) -> None:
    """Refuse a store made with other settings (names the store and the differing fields)."""
    if store.segments != segments:
        raise StoreError(f"{store.path}: store has segments={store.segments}, this run extract.segments={segments}; "
                         "use another store.path or the store's settings")
    if store.fingerprint != attrs["fingerprint"]:
        old = store.attrs.get("fingerprint_fields") or {}
        diffs = differing_fields(old, attrs["fingerprint_fields"]) if old else ["(the store records no fingerprint fields)"]
        raise StoreError(
            f"{store.path}: refusing to write: the store was made with other extraction settings "
            f"(fingerprint {store.fingerprint} != {attrs['fingerprint']}); differing: " + "; ".join(diffs[:12])
            + ". Use another store.path, or the store's settings (see its 'extractor' attribute)."
        )


def grow_store(store: FeatureStore, new_keys: Sequence[str]) -> None:
    """Append rows for ``new_keys`` (status missing) to every array of the store."""
    if not new_keys:
        return
    old = len(store)
    total = old + len(new_keys)
    for name, arr in store.group.arrays():
        if name != "ids":
            arr.resize((total,) + tuple(arr.shape[1:]))
    ids = store.group["ids"]
    ids.resize((total,))
    ids[old:total] = np.asarray(list(new_keys), dtype=str)
    store.set_attrs(num_rows=total)
    store._ids = store._row_of = None
    log.info("%s: added %d rows (now %d)", store.path, len(new_keys), total)


def distinct_requests(requests: Sequence[VideoRequest], allow_empty: bool = False) -> list[VideoRequest]:
    """``requests`` without repeated keys (the first request of a key wins), in order.

    Raises ``ConfigError`` when nothing is left, unless ``allow_empty``."""
    distinct: dict[str, VideoRequest] = {}
    for request in requests:
        distinct.setdefault(request.key, request)  # first wins
    if not distinct and not allow_empty:
        raise ConfigError("nothing to extract: the manifest(s) have no rows")
    return list(distinct.values())


@contextlib.contextmanager
def open_run_store(path: Path, keys: Sequence[str], segments: int, specs: Sequence[ArraySpec],
                   attrs: dict[str, Any], store_cfg, create_attrs: dict[str, Any] | None = None):
    """Create the store if absent (with ``create_attrs``, default ``attrs``), take its lock, open it
    for writing, refuse one of other settings (:func:`check_identity`, :func:`extract.store.check_arrays`)
    and append rows for the ``keys`` it lacks; yields the open :class:`FeatureStore` while the lock
    is held (released on exit)."""
    from .lock import StoreLock

    ensure_store(path, keys, segments, specs, attrs if create_attrs is None else create_attrs, store_cfg)
    with StoreLock(path):
        store = open_store(path, mode="r+")
        check_identity(store, attrs, segments)
        check_arrays(store, specs)
        present = set(store.ids.tolist())
        grow_store(store, [k for k in keys if k not in present])
        yield store


# ------------------------------------------------------------------------------------------
# running


@dataclasses.dataclass
class RunSummary:
    """What a run did. ``failed_total`` counts requested rows that are failed in the store at the
    end (including ones failed by earlier runs and skipped now)."""

    store: Path
    requested: int
    done: int = 0
    failed: int = 0
    skipped: int = 0
    failed_total: int = 0
    seconds: float = 0.0
    #: seconds from "all decode workers started" to the end (throughput without start-up costs)
    steady_seconds: float = 0.0

    @property
    def videos_per_s(self) -> float:
        return (self.done + self.failed) / self.seconds if self.seconds > 0 else 0.0

    @property
    def exit_code(self) -> int:
        return 1 if self.failed_total else 0

    def text(self) -> str:
        lines = [
            f"avel-extract: {self.store}",
            f"  done {self.done}, skipped {self.skipped} (already in the store), failed {self.failed}"
            f" of {self.requested} videos",
            f"  {self.videos_per_s:.2f} videos/s, wall time {self.seconds:.1f} s",
        ]
        if self.failed_total:
            lines.append(f"  {self.failed_total} requested videos are failed; reasons in {self.store / 'logs' / FAILURES_FILE}"
                         " and the store's 'reason' array")
        return "\n".join(lines)


def _set_cpu_threads(device: str) -> None:
    """On CPU, torch uses every core (logical CPUs) unless OMP_NUM_THREADS says otherwise."""
    import torch

    if not str(device).startswith("cuda") and not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(os.cpu_count() or 1)


def combine_rows(extractors, outputs: list[list[dict[str, np.ndarray]]], segments: int) -> list[dict[str, np.ndarray]]:
    """Merge per-extractor rows into store rows; ``valid`` = AND of the ``<name>_valid`` flags."""
    rows = []
    for per_video in zip(*outputs):
        row: dict[str, np.ndarray] = {}
        valid = np.ones(segments, dtype=bool)
        for extractor, out in zip(extractors, per_video):
            for name, value in out.items():
                if name == f"{extractor.name}_valid":
                    valid &= np.asarray(value, dtype=bool)
                else:
                    row[name] = value
        row["valid"] = valid
        rows.append(row)
    return rows


def compute_videos(extractors, videos: list, segments: int) -> list[dict[str, np.ndarray] | Failure]:
    """Rows for decoded videos; if the batch fails, each video alone (so one bad video fails alone)."""
    if not videos:
        return []
    try:
        return combine_rows(extractors, [e.compute(videos) for e in extractors], segments)
    except Exception as exc:  # noqa: BLE001
        if len(videos) == 1:
            log.warning("%s: compute failed: %s", videos[0].key, exc)
            return [Failure(f"compute failed: {type(exc).__name__}: {exc}")]
        log.warning("batch of %d videos failed (%s); computing them one by one", len(videos), exc)
        return [compute_videos(extractors, [v], segments)[0] for v in videos]


def _note(info: dict) -> str:
    """A short remark stored in ``reason`` for done videos (e.g. no audio)."""
    return str(info.get("audio_error", "")) if info else ""


class _Prefetch:
    """Runs the decode pool in a thread that fills a bounded queue (decode overlaps compute)."""

    _END = object()

    def __init__(self, pool, fn: Callable, tasks: list[tuple], maxsize: int):
        self.queue: queue.Queue = queue.Queue(maxsize=maxsize)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(pool, fn, tasks), name="avel-prefetch", daemon=True)
        self.thread.start()

    def _run(self, pool, fn, tasks) -> None:
        try:
            for result in pool.imap(fn, tasks):
                while not self.stop.is_set():
                    try:
                        self.queue.put(result, timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if self.stop.is_set():
                    return
            self.queue.put(self._END)
        except BaseException as exc:  # noqa: BLE001 - hand it to the consumer
            self.queue.put(exc)

    def get(self):
        item = self.queue.get()
        if isinstance(item, BaseException):
            raise item
        if item is self._END:
            raise RuntimeError("decode prefetch ended early")
        return item

    def close(self, pool) -> None:
        self.stop.set()
        pool.cancel()
        self.thread.join(timeout=30)


def _append_failures(path: Path, records: list[dict]) -> None:
    from .lock import log_dir

    if records:
        with open(log_dir(path) / FAILURES_FILE, "a") as fh:
            for record in records:
                fh.write(json.dumps(record) + "\n")


def run_extraction(
    pipeline,
    requests: Sequence[VideoRequest],
    *,
    store_path: str | os.PathLike | None = None,
    progress: bool = True,
    decode_fn: Callable = decode_video,
    extractors: list | None = None,
) -> RunSummary:
    """Extract ``requests`` into the store (see the module docstring). Returns a :class:`RunSummary`.

    ``decode_fn(request, grids, segments, audio)`` runs in the decode workers (tests inject slow or
    failing ones; it must be picklable); ``extractors`` defaults to
    :func:`extract.extractors.build_extractors` of ``pipeline.extract``.
    """
    from .extractors import build_extractors, extractor_identity, resolve_device

    started = time.monotonic()
    cfg, store_cfg = pipeline.extract, pipeline.store
    path = Path(store_path) if store_path is not None else pipeline.path(store_cfg.path)
    requests = distinct_requests(requests)
    device = resolve_device(cfg.device)
    _set_cpu_threads(device)
    if decode_fn is decode_video:
        warm_up()  # the decode workers' forkserver imports its modules while the networks load
    if extractors is None:
        extractors = build_extractors(cfg, device)
    identities = {e.name: e.identity() for e in extractors} if extractors else extractor_identity(cfg)
    attrs = store_attrs(cfg, identities)
    specs = [s for s in core_specs(cfg.segments) if s.name == "valid"] + [s for e in extractors for s in e.arrays()]
    with open_run_store(path, [r.key for r in requests], cfg.segments, specs, attrs, store_cfg) as store:
        return _run_shards(store, requests, extractors, cfg, progress, decode_fn, started)


def plan_shards(store: FeatureStore, requests: Sequence[VideoRequest]) -> tuple[list[tuple[int, list[tuple[int, VideoRequest]]]], int]:
    """Shards to compute, each with its requested ``(row, request)`` pairs; and the skipped count."""
    status = store.status()
    by_shard: dict[int, list[tuple[int, VideoRequest]]] = {}
    for request in requests:
        row = store.row_of(request.key)
        by_shard.setdefault(store.shard_of(row), []).append((row, request))
    todo, skipped = [], 0
    for shard in sorted(by_shard):
        members = sorted(by_shard[shard], key=lambda item: item[0])
        if all(status[row] != STATUS_MISSING for row, _ in members):
            skipped += len(members)
        else:
            todo.append((shard, members))
    return todo, skipped


def decode_inputs(extractors) -> tuple[list, bool]:
    """What the decoder must deliver for ``extractors``: their distinct frame grids (first of each
    name, in order) and whether any needs audio."""
    grids = list({g.name: g for g in (e.frame_grid for e in extractors) if g is not None}.values())
    return grids, any(e.uses_audio for e in extractors)


def _run_shards(store, requests, extractors, cfg, progress, decode_fn, started) -> RunSummary:
    from tqdm import tqdm

    from .decode import DecodePool

    todo, skipped = plan_shards(store, requests)
    summary = RunSummary(store=store.path, requested=len(requests), skipped=skipped)
    grids, audio = decode_inputs(extractors)
    tasks = [(request, grids, cfg.segments, audio) for _, members in todo for _, request in members]
    log.info("%s: %d videos to extract in %d shards, %d already done", store.path, len(tasks), len(todo), skipped)
    if tasks:
        workers = cfg.decode_workers or os.cpu_count() or 1
        workers = max(1, min(workers, len(tasks)))
        bar = tqdm(total=len(tasks), unit="video", disable=not progress, dynamic_ncols=True, mininterval=1.0,
                   desc="extract")
        pool = DecodePool(workers, cfg.decode_timeout_s, ahead=2 * workers + store.rows_per_shard)
        prefetch = None
        try:
            pool.start()
            pool.wait_ready()
            steady_start = time.monotonic()
            prefetch = _Prefetch(pool, decode_fn, tasks, maxsize=store.rows_per_shard + workers)
            for shard, members in todo:
                decoded = [prefetch.get() for _ in members]
                done, failed = finish_shard(store, shard, members, decoded, extractors, cfg.segments)
                summary.done += done
                summary.failed += failed
                bar.update(len(members))
                bar.set_postfix(failed=summary.failed, refresh=False)
            summary.steady_seconds = time.monotonic() - steady_start
        finally:
            if prefetch is not None:
                prefetch.close(pool)
            pool.close()
            bar.close()
    status = store.status()
    summary.failed_total = int(sum(status[store.row_of(r.key)] == STATUS_FAILED for r in requests))
    summary.seconds = time.monotonic() - started
    return summary


def finish_shard(store: FeatureStore, shard: int, members: list[tuple[int, VideoRequest]],
                 decoded: list, extractors, segments: int) -> tuple[int, int]:
    """Compute the decoded videos of a shard and write the whole shard. Returns (done, failed)."""
    ok = [(i, d) for i, d in enumerate(decoded) if not isinstance(d, Failure)]
    computed = compute_videos(extractors, [d for _, d in ok], segments)
    outcome: dict[int, Any] = {i: d for i, d in enumerate(decoded) if isinstance(d, Failure)}
    for (i, video), row in zip(ok, computed):
        outcome[i] = (row, video) if not isinstance(row, Failure) else row

    rows = store.shard_rows(shard)
    names = [name for name, _ in store.group.arrays() if name not in ("ids", "status", "reason")]
    values = {name: store.read(name, slice(rows.start, rows.stop)) for name in names}
    status = np.asarray(store.group["status"][rows.start: rows.stop], dtype=np.int8).copy()
    reason = np.asarray([str(r) for r in store.group["reason"][rows.start: rows.stop]], dtype=object)
    failures, done, failed = [], 0, 0
    for i, (row, request) in enumerate(members):
        local = row - rows.start
        result = outcome[i]
        for name in names:
            values[name][local] = 0
        if isinstance(result, Failure):
            status[local], reason[local] = STATUS_FAILED, result.reason
            failures.append({"time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                             "key": request.key, "path": request.path, "shard": shard, "reason": result.reason})
            log.warning("%s (%s): failed: %s", request.key, request.path, result.reason)
            failed += 1
        else:
            features, video = result
            for name, value in features.items():
                if name in values:
                    values[name][local] = value
            status[local], reason[local] = STATUS_DONE, _note(video.info)
            done += 1
    store.write_shard(shard, values, status, [str(r) for r in reason])
    _append_failures(store.path, failures)
    return done, failed


def run_extraction_cli(pipeline, split: str | None = None, manifest: str | None = None,
                       video_root: str | None = None, progress: bool = True) -> int:
    """``avel-extract`` main body: run, print the summary, return the exit code (0 ok, 1 some video
    failed, 2 the run could not start: configuration, manifest, store, lock or weights problem)."""
    import sys

    from .lock import StoreLocked
    from .manifest import ManifestError

    try:
        requests = collect_requests(pipeline, split, manifest, video_root)
        summary = run_extraction(pipeline, requests, progress=progress)
    except (ConfigError, ManifestError, StoreError, StoreLocked, FileNotFoundError, ValueError) as exc:
        print(f"avel-extract: error: {exc}", file=sys.stderr)
        return 2
    print(summary.text(), file=sys.stderr)
    return summary.exit_code
