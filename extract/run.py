"""The extraction runner behind ``avel-extract``: manifests -> decode workers -> networks -> store.

How a run goes (the single-machine path; :mod:`extract.distributed` runs the same shards as Dask
tasks, :mod:`extract.cache` fills a project store from a shared cache):

1. :mod:`extract.requests` turns the split(s) or ``--manifest`` into video windows with absolute
   paths, one per distinct feature key.
2. The extractors are built (missing pretrained weights stop the run here, before the store is
   touched); the precision recorded is the one that runs on the device
   (:func:`extract.provenance.effective_config`). :mod:`extract.prepare` creates the store if
   absent (atomically), takes its lock (:mod:`extract.core.lock`; ``wait`` queues behind another
   writer), repairs an interrupted growth, refuses a store of another **fingerprint**
   (:mod:`extract.provenance`: the store's extractors' identities - weights, preprocessing,
   precision - segments and schema version; nothing else) naming the differing fields, appends
   the keys it lacks and takes a new lease (tasks of earlier runs no longer write).
3. :func:`plan_shards` picks the rows to compute: missing rows, rows whose file changed since
   they were made (size or modification time differ from the row's ``source`` record), and with
   ``retry_failed`` the failed rows; every other requested row is skipped. Work unit = one store
   **shard** (rows ``k*S .. k*S+S-1``): its planned rows are decoded and computed together and the
   shard is written whole (:meth:`FeatureStore.write_shard`, status last), so a run that is killed
   at any point and started again ends with a store identical, bit for bit, to an uninterrupted
   run's. Like every shard writer (Dask tasks, the cache's copy) it reads, changes and writes the
   shard under the shard's lock and only while its lease still holds (:class:`ShardBlock`), so
   an orphaned task of an earlier run never interleaves with it.
4. Decode worker processes (:class:`extract.decode.DecodePool`, ``extract.decode_workers``, default
   all cores) run ahead of the networks through a bounded queue; a decode that takes longer than
   ``extract.decode_timeout_s`` is killed and its video marked failed. The main process runs the
   extractors on all decoded videos of a shard at once (frames batched across videos).
5. A bad video never stops the run: its row gets status ``failed``, the reason goes to the
   ``reason`` array and to ``<store>/logs/failures.jsonl``. An error of the environment (a library
   that does not load, CUDA, memory: :func:`is_system_error`) is not the video's fault: its row
   stays missing, and when the same one hits :data:`SYSTEMIC_LIMIT` videos in a row the run stops
   (exit 2); errors are the same when their reasons differ only in numbers, addresses and paths
   (:func:`error_kind`: two CUDA out-of-memory errors asking for other byte counts). Every row
   records its file identity (``source``) and what computed it (``ran``). The run ends by
   verifying the store (the shards it wrote when the store was complete before, else all; the
   status of every row always) and marking it ``complete``, then a summary that counts every
   requested video once; the exit code is 1 when some requested video is failed or missing.

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

import dataclasses
import datetime as _dt
import json
import logging
import os
import queue
import re
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .decode import Failure, VideoRequest, decode_video, warm_up
from .prepare import open_claimed_store, open_run_store
from .provenance import effective_config, file_identity, ran_label, store_attrs
from .requests import distinct_requests
from .core.store import (
    STATUS_DONE,
    STATUS_FAILED,
    STATUS_MISSING,
    FeatureStore,
    core_specs,
)

log = logging.getLogger(__name__)

__all__ = [
    "RunSummary",
    "Plan",
    "SystemFailure",
    "SystemicError",
    "SystemicGuard",
    "run_extraction",
    "plan_shards",
    "decode_inputs",
    "finish_shard",
    "count_outcomes",
    "close_run",
    "VideoOutcome",
    "append_failures",
    "ShardBlock",
    "FenceLost",
    "error_kind",
    "FAILURES_FILE",
]

#: failure log, one JSON object per line, under ``<store>/logs/``
FAILURES_FILE = "failures.jsonl"
#: packages whose versions are recorded in the store (distribution name -> label)
# ------------------------------------------------------------------------------------------
# running

#: consecutive videos failing with the same environment error that stop a run (exit 2)
SYSTEMIC_LIMIT = 3
#: reason fragments of errors that come from this machine, not from the video
_SYSTEM_MARKERS = ("ImportError", "ModuleNotFoundError", "Could not load", "undefined symbol", "cannot open shared object",
                   "OutOfMemoryError", "out of memory", "CUDA error", "CUDA out of memory", "cuDNN", "CUBLAS",
                   "No space left on device", "Read-only file system")


class SystemFailure(Failure):
    """A video that could not be computed because of the environment (a library that does not
    load, CUDA, memory, disk): not the video's fault, so its row stays missing (never failed)."""


class SystemicError(RuntimeError):
    """The same environment error hit several videos in a row: the run stops (exit 2)."""


class FenceLost(RuntimeError):
    """A writer's fence no longer holds: a newer run owns the store (or the writer's claim ended)."""


def is_system_error(exc: BaseException | str) -> bool:
    """Whether an exception (or a failure reason) comes from the environment rather than the input."""
    if isinstance(exc, (ImportError, MemoryError)):
        return True
    text = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    return any(marker in text for marker in _SYSTEM_MARKERS)


def as_system_failure(result):
    """A decode :class:`Failure` whose reason is an environment error, as a :class:`SystemFailure`."""
    if isinstance(result, Failure) and not isinstance(result, SystemFailure) and is_system_error(result.reason):
        return SystemFailure(result.reason)
    return result


#: the parts of an error text that differ between occurrences of the same error: paths, addresses,
#: numbers (byte counts, device numbers, line numbers); :func:`error_kind` replaces them
_VOLATILE = ((re.compile(r"0[xX][0-9a-fA-F]+"), "<addr>"),
             (re.compile(r"(?<![\w.])(?:~|\.{1,2})?/[^\s'\",;()\[\]{}<>]+"), "<path>"),
             (re.compile(r"\d+(?:\.\d+)?"), "<n>"))


def error_kind(reason: str) -> str:
    """A failure reason with its paths, addresses and numbers replaced (the error class and the
    words kept): two CUDA out-of-memory errors that asked for different byte counts, or the same
    missing library seen from two files, are the same kind."""
    for pattern, placeholder in _VOLATILE:
        reason = pattern.sub(placeholder, reason)
    return reason


class SystemicGuard:
    """Counts consecutive :class:`SystemFailure` s of the same kind (:func:`error_kind`: the
    reason with numbers, addresses and paths stripped); raises :class:`SystemicError` at
    :data:`SYSTEMIC_LIMIT`. Any other outcome resets it."""

    def __init__(self, limit: int = SYSTEMIC_LIMIT):
        self.limit, self.count, self.reason, self.seen = limit, 0, None, 0

    def observe(self, key: str, result) -> None:
        if not isinstance(result, SystemFailure):
            self.count, self.reason = 0, None
            return
        self.seen += 1
        kind = error_kind(result.reason)
        self.count = self.count + 1 if kind == self.reason else 1
        self.reason = kind
        if self.count >= self.limit:
            raise SystemicError(
                f"stopped: {self.count} videos in a row failed with the same error of this machine, not of the "
                f"videos (last: {key}): {result.reason}. Their rows are left missing (not failed). Fix the environment "
                "(`avel-extract doctor` checks it), then run the same command again.")


@dataclasses.dataclass(frozen=True)
class VideoOutcome:
    """The final state of one requested row (a video window) in the store after a run:
    ``status`` ``"done"``, ``"failed"`` (``reason`` is the one-line reason stored in the store's
    ``reason`` array, e.g. ``cannot open video: ...``) or ``"missing"`` (not extracted: an
    environment error stopped the run, or its task was lost)."""

    key: str
    path: str
    status: str
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "done"


#: store status code -> :attr:`VideoOutcome.status`
OUTCOME_NAMES = {STATUS_DONE: "done", STATUS_FAILED: "failed", STATUS_MISSING: "missing"}


@dataclasses.dataclass
class RunSummary:
    """What a run did; every requested row is counted exactly once.

    ``done``/``failed`` = computed now; ``skipped_done``/``skipped_failed`` = already final in the
    store and left alone; ``retried`` = failed rows computed again (``--retry-failed``), of which
    ``retried_ok`` are now done; ``changed`` = rows computed again because their file changed;
    ``missing`` = requested rows not extracted (environment error, lost tasks);
    ``failed_total`` = requested rows that are failed at the end."""

    store: Path
    requested: int
    done: int = 0
    failed: int = 0
    skipped_done: int = 0
    skipped_failed: int = 0
    retried: int = 0
    retried_ok: int = 0
    changed: int = 0
    missing: int = 0
    failed_total: int = 0
    seconds: float = 0.0
    #: seconds from "all decode workers started" to the end (throughput without start-up costs)
    steady_seconds: float = 0.0
    #: the environment error that stopped the run, if any
    systemic: str = ""
    #: Dask: shard tasks that ran more than once (their worker died), and workers that left
    rescheduled: int = 0
    workers_lost: int = 0
    #: {request key: :class:`VideoOutcome`} of every requested row at the end (:func:`close_run`)
    outcomes: dict[str, VideoOutcome] = dataclasses.field(default_factory=dict, repr=False)

    #: what ``done``/``failed`` count, in the summary text
    now_label = "computed now"

    @property
    def skipped(self) -> int:
        return self.skipped_done + self.skipped_failed

    @property
    def lost(self) -> int:
        """Requested rows not extracted at the end (Dask: their tasks failed for good)."""
        return self.missing

    @property
    def videos_per_s(self) -> float:
        return (self.done + self.failed) / self.seconds if self.seconds > 0 else 0.0

    @property
    def exit_code(self) -> int:
        if self.systemic:
            return 2
        return 1 if self.failed_total or self.missing else 0

    def text(self) -> str:
        lines = [
            f"avel-extract: {self.store}",
            f"  done {self.done}, failed {self.failed} ({self.now_label}); skipped {self.skipped} (already in the store)"
            f" = {self.skipped_done} done + {self.skipped_failed} failed; of {self.requested} videos",
        ]
        if self.retried:
            lines.append(f"  retried {self.retried} failed videos: {self.retried_ok} now done")
        if self.changed:
            lines.append(f"  re-extracted {self.changed} videos whose file changed since their row was made")
        if self.missing:
            lines.append(f"  not extracted {self.missing}: run the same command again to compute them")
        if self.rescheduled or self.workers_lost:
            lines.append(f"  {self.workers_lost} Dask workers left during the run; {self.rescheduled} shard tasks "
                         "were rescheduled (results unaffected)")
        lines.append(f"  {self.videos_per_s:.2f} videos/s, wall time {self.seconds:.1f} s")
        if self.failed_total:
            noun = "video" if self.failed_total == 1 else "videos"
            lines.append(f"  {self.failed_total} requested {noun} failed; reasons in {self.store / 'logs' / FAILURES_FILE}"
                         " and the store's 'reason' array; `--retry-failed` extracts them again")
        if self.systemic:
            lines.append(f"  {self.systemic}")
        return "\n".join(lines)


@dataclasses.dataclass
class Plan:
    """The shards to compute, each with its ``(row, request)`` pairs, and why rows are (not) computed."""

    shards: list[tuple[int, list[tuple[int, VideoRequest]]]]
    sources: dict[str, str]
    skipped_done: int = 0
    skipped_failed: int = 0
    retried: set = dataclasses.field(default_factory=set)
    changed: set = dataclasses.field(default_factory=set)

    @property
    def skipped(self) -> int:
        return self.skipped_done + self.skipped_failed

    def start_summary(self, store_path: Path, requested: int) -> RunSummary:
        return RunSummary(store=store_path, requested=requested, skipped_done=self.skipped_done,
                          skipped_failed=self.skipped_failed, retried=len(self.retried), changed=len(self.changed))


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
            reason = f"compute failed: {type(exc).__name__}: {exc}"
            return [SystemFailure(reason) if is_system_error(exc) else Failure(reason)]
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

    def _put(self, item) -> bool:
        """Put unless the consumer stopped (a full queue must never block an abort)."""
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, pool, fn, tasks) -> None:
        try:
            for result in pool.imap(fn, tasks):
                if not self._put(result):
                    return
            self._put(self._END)
        except BaseException as exc:  # noqa: BLE001 - hand it to the consumer
            self._put(exc)

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
        if self.thread.is_alive():
            log.warning("the decode prefetch thread did not stop within 30 s")


def append_failures(path: Path, records: list[dict]) -> None:
    from .core.lock import log_dir

    if records:
        with open(log_dir(path) / FAILURES_FILE, "a") as fh:
            for record in records:
                fh.write(json.dumps(record) + "\n")


def _set_cpu_threads(device: str, threads: int | None = None) -> None:
    """On CPU, torch uses ``threads`` threads (``extract.threads``, ``--threads``), else every core
    (logical CPUs) unless OMP_NUM_THREADS says otherwise."""
    import torch

    if str(device).startswith("cuda"):
        return
    if threads:
        torch.set_num_threads(int(threads))
    elif not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(os.cpu_count() or 1)


def run_extraction(
    pipeline,
    requests: Sequence[VideoRequest],
    *,
    store_path: str | os.PathLike | None = None,
    progress: bool = True,
    decode_fn: Callable = decode_video,
    extractors: list | None = None,
    retry_failed: bool = False,
    wait: bool = False,
    claim=None,
) -> RunSummary:
    """Extract ``requests`` into the store (see the module docstring). Returns a :class:`RunSummary`.

    ``decode_fn(request, grids, segments, audio)`` runs in the decode workers (tests inject slow or
    failing ones; it must be picklable); ``extractors`` defaults to
    :func:`extract.extractors.build_extractors` of ``pipeline.extract``. ``retry_failed``: compute
    failed rows again; ``wait``: queue behind another writer of the store instead of refusing.
    ``claim``: an :class:`extract.core.lock.RowClaim` the caller holds on the requested rows of a store
    shared by several writers (the cache, :mod:`extract.cache`): the store is then neither locked
    nor grown nor given a new lease, its shards are fenced by the claim and its attributes are
    left to the caller (:func:`extract.prepare.open_claimed_store`).
    """
    from .extractors import build_extractors, extractor_identity, resolve_device

    started = time.monotonic()
    store_cfg = pipeline.store
    device = resolve_device(pipeline.extract.device)
    cfg = effective_config(pipeline.extract, device)
    path = Path(store_path) if store_path is not None else pipeline.path(store_cfg.path)
    path = Path(os.path.abspath(path))
    requests = distinct_requests(requests, allow_empty=True)
    _set_cpu_threads(device, cfg.threads)
    if decode_fn is decode_video:
        warm_up()  # the decode workers' forkserver imports its modules while the networks load
    if extractors is None:
        extractors = build_extractors(cfg, device)
    identities = {e.name: e.identity() for e in extractors} if extractors else extractor_identity(cfg)
    attrs = store_attrs(cfg, identities)
    specs = [s for s in core_specs(cfg.segments) if s.name == "valid"] + [s for e in extractors for s in e.arrays()]
    keys = [r.key for r in requests]
    opened = (open_claimed_store(path, keys, cfg.segments, attrs, claim) if claim is not None
              else open_run_store(path, keys, cfg.segments, specs, attrs, store_cfg, wait=wait))
    with opened as store:
        return _run_shards(store, requests, extractors, cfg, progress, decode_fn, started, retry_failed)


def plan_shards(store: FeatureStore, requests: Sequence[VideoRequest], retry_failed: bool = False) -> Plan:
    """Which requested rows to compute, grouped by shard: rows that are missing; rows (done or
    failed) whose file changed since they were made (its size or modification time differs from
    the row's ``source``; a failed row made before its file existed counts as changed once the
    file is there); and with ``retry_failed`` the failed rows. Every other row is skipped."""
    status = store.status()
    recorded = store.records("source")
    plan = Plan(shards=[], sources={r.key: file_identity(r.path) for r in requests})
    by_shard: dict[int, list[tuple[int, VideoRequest]]] = {}
    for request in requests:
        row = store.row_of(request.key)
        state, now, then = status[row], plan.sources[request.key], recorded[row]
        if state != STATUS_MISSING and now and now != then and (then or state == STATUS_FAILED):
            plan.changed.add(request.key)
        elif state == STATUS_FAILED and retry_failed:
            plan.retried.add(request.key)
        elif state == STATUS_DONE:
            plan.skipped_done += 1
            continue
        elif state == STATUS_FAILED:
            plan.skipped_failed += 1
            continue
        by_shard.setdefault(store.shard_of(row), []).append((row, request))
    plan.shards = [(shard, sorted(members, key=lambda item: item[0])) for shard, members in sorted(by_shard.items())]
    return plan


def decode_inputs(extractors) -> tuple[list, bool]:
    """What the decoder must deliver for ``extractors``: their distinct frame grids (first of each
    name, in order) and whether any needs audio."""
    grids = list({g.name: g for g in (e.frame_grid for e in extractors) if g is not None}.values())
    return grids, any(e.uses_audio for e in extractors)


def _run_shards(store, requests, extractors, cfg, progress, decode_fn, started, retry_failed=False) -> RunSummary:
    from .decode import DecodePool
    from .core.progress import progress_bar

    plan = plan_shards(store, requests, retry_failed)
    summary = plan.start_summary(store.path, len(requests))
    todo = plan.shards
    grids, audio = decode_inputs(extractors)
    tasks = [(request, grids, cfg.segments, audio) for _, members in todo for _, request in members]
    log.info("%s: %d videos to extract in %d shards, %d already done", store.path, len(tasks), len(todo), plan.skipped)
    guard = SystemicGuard()
    if tasks:
        if not store.shared:
            store.set_attrs(complete=False, verified=None)
        workers = cfg.decode_workers or os.cpu_count() or 1
        workers = max(1, min(workers, len(tasks)))
        bar = progress_bar(len(tasks), progress, "extract")
        pool = DecodePool(workers, cfg.decode_timeout_s, ahead=2 * workers + store.rows_per_shard)
        prefetch = None
        try:
            pool.start()
            pool.wait_ready()
            steady_start = time.monotonic()
            prefetch = _Prefetch(pool, decode_fn, tasks, maxsize=store.rows_per_shard + workers)
            for shard, members in todo:
                decoded = [prefetch.get() for _ in members]
                outcome = finish_shard(store, shard, members, decoded, extractors, cfg.segments,
                                       sources=plan.sources, guard=guard)
                if outcome is None:
                    raise FenceLost(f"{store.path}: another run took the store over while this one was writing "
                                    f"(shard {shard}); this run stops, the other one finishes the work")
                count_outcomes(summary, plan, outcome)
                bar.update(len(members))
                bar.set_postfix(failed=summary.failed, refresh=False)
            summary.steady_seconds = time.monotonic() - steady_start
        except (SystemicError, FenceLost) as exc:
            summary.systemic = str(exc)
            log.error("%s", exc)
        finally:
            if prefetch is not None:
                prefetch.close(pool)
            pool.close()
            bar.close()
    return close_run(store, requests, summary, started, [shard for shard, _ in todo])


def count_outcomes(summary: RunSummary, plan: Plan, outcome: dict[str, int]) -> None:
    """Add one shard's outcomes ({key: status written}) to the summary."""
    for key, state in outcome.items():
        if state == STATUS_DONE:
            summary.done += 1
            summary.retried_ok += key in plan.retried
        elif state == STATUS_FAILED:
            summary.failed += 1


def close_run(store: FeatureStore, requests, summary: RunSummary, started: float,
              shards: Sequence[int] | None = None) -> RunSummary:
    """Final counts from the store, and the ``complete`` mark (:func:`extract.core.store.mark_complete`).

    ``shards``: the shards this run wrote. When the store was complete before the run
    (``store.verified_before``, set by :func:`extract.prepare.open_run_store`), only they are
    read back, so a store that only grows (avel-predict's) is not re-read whole on every call; the
    status of every row is checked either way. Otherwise every shard is read. A shared store
    (the cache) is marked by its owner (:mod:`extract.cache`), not here."""
    from .core.store import mark_complete

    status = store.status()
    rows = [store.row_of(r.key) for r in requests]
    final = [status[row] for row in rows]
    summary.failed_total = int(sum(s == STATUS_FAILED for s in final))
    summary.missing = int(sum(s == STATUS_MISSING for s in final))
    bad = sorted({row for row, state in zip(rows, final) if state != STATUS_DONE})
    reason_of = dict(zip(bad, (str(x) for x in store.read("reason", np.asarray(bad, np.int64))))) if bad else {}
    summary.outcomes = {r.key: VideoOutcome(r.key, str(r.path), OUTCOME_NAMES.get(int(state), "missing"),
                                            reason_of.get(row, ""))
                        for r, row, state in zip(requests, rows, final)}
    if not store.shared and store.attrs.get("complete") is not True:
        mark_complete(store, shards if store.verified_before and shards is not None else None)
    summary.seconds = time.monotonic() - started
    return summary


def finish_shard(store: FeatureStore, shard: int, members: list[tuple[int, VideoRequest]],
                 decoded: list, extractors, segments: int, *, sources: dict[str, str] | None = None,
                 guard: SystemicGuard | None = None, lease: str | None = None) -> dict[str, int] | None:
    """Compute the decoded videos of a shard and write the whole shard.

    Returns ``{key: status written}`` for the members (a :class:`SystemFailure` leaves its row as
    it was and is not in the dict). ``guard`` sees every outcome in row order and may raise
    :class:`SystemicError` before anything is written. The shard is read and written under its
    shard lock, and only if the writer's fence still holds (``lease``, default ``store.lease``: the
    run's lease token, or the claim of a cache writer; see :mod:`extract.core.lock`); otherwise nothing
    is written and None is returned (a newer run owns the store).
    """
    decoded = [as_system_failure(d) for d in decoded]
    ok = [(i, d) for i, d in enumerate(decoded) if not isinstance(d, Failure)]
    computed = compute_videos(extractors, [d for _, d in ok], segments)
    outcome: dict[int, Any] = {i: d for i, d in enumerate(decoded) if isinstance(d, Failure)}
    for (i, video), row in zip(ok, computed):
        outcome[i] = (row, video) if not isinstance(row, Failure) else row
    if guard is not None:
        for i, (_, request) in enumerate(members):
            guard.observe(request.key, outcome[i])
    try:
        with ShardBlock(store, shard, lease) as block:
            _fill_shard(block, members, outcome, sources or {}, ran_label(extractors))
            return block.commit()
    except FenceLost as exc:
        log.warning("%s; this writer's results are dropped", exc)
        return None


class ShardBlock:
    """One shard of every per-row array, rewritten whole by one fenced writer.

    ``with ShardBlock(store, shard, fence) as block:`` takes the shard's lock
    (:class:`extract.core.lock.shard_lock`), checks that the writer's fence still holds (``fence``,
    default ``store.lease``; :func:`extract.core.lock.fence_holds`, else :class:`FenceLost`) and only
    then reads the shard, so the read, the changes and the write all happen under the lock and no
    other writer's rows are lost in between. Set the rows of the members (:meth:`set_done`,
    :meth:`set_failed`), then :meth:`commit` writes the shard (status last) and appends the
    failures to ``logs/failures.jsonl``. Other rows keep what they hold."""

    def __init__(self, store: FeatureStore, shard: int, fence: str | None = None):
        self.store, self.shard = store, shard
        self.fence = fence if fence is not None else store.lease
        self.written: dict[str, int] = {}
        self.failures: list[dict] = []
        self._lock = None

    def __enter__(self) -> "ShardBlock":
        from .core.lock import fence_holds, shard_lock

        lock = shard_lock(self.store.path, self.shard)
        lock.__enter__()
        try:
            if not fence_holds(self.store.path, self.fence):
                raise FenceLost(f"shard {self.shard} of {self.store.path}: a newer run owns the store"
                                if not str(self.fence or "").startswith("claim:") else
                                f"shard {self.shard} of {self.store.path}: this writer's claim on its rows ended")
            self._read()
        except BaseException:
            lock.__exit__(None, None, None)
            raise
        self._lock = lock
        return self

    def __exit__(self, *exc) -> None:
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.__exit__(None, None, None)

    def _read(self) -> None:
        store = self.store
        self.rows = store.shard_rows(self.shard)
        lo, hi = self.rows.start, self.rows.stop
        self.names = store.feature_names()
        self.values = {name: store.read(name, slice(lo, hi)) for name in self.names}
        self.status = np.asarray(store.group["status"][lo:hi], dtype=np.int8).copy()
        self.records = {name: store.records(name)[lo:hi].copy() for name in ("reason", "source", "ran")}

    def _set(self, row: int, request: VideoRequest, state: int, reason: str, source: str, ran: str) -> int:
        local = row - self.rows.start
        for name in self.names:
            self.values[name][local] = 0
        self.status[local] = state
        self.records["reason"][local], self.records["source"][local], self.records["ran"][local] = reason, source, ran
        self.written[request.key] = int(state)
        return local

    def set_done(self, row: int, request: VideoRequest, features: dict[str, np.ndarray], *, source: str, ran: str,
                 note: str = "") -> None:
        local = self._set(row, request, STATUS_DONE, note, source, ran)
        for name, value in features.items():
            if name in self.values:
                self.values[name][local] = value

    def set_failed(self, row: int, request: VideoRequest, reason: str, *, source: str) -> None:
        self._set(row, request, STATUS_FAILED, reason, source, "")
        self.failures.append({"time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                              "key": request.key, "path": request.path, "shard": self.shard, "reason": reason})

    def commit(self) -> dict[str, int]:
        """Write the shard and the failure log (inside the ``with``); returns ``{key: status written}``."""
        if self._lock is None:
            raise RuntimeError("ShardBlock.commit outside its `with` block (the shard lock is not held)")
        records = {name: [str(v) for v in values] for name, values in self.records.items()}
        self.store.write_shard(self.shard, self.values, self.status, records.pop("reason"), records)
        append_failures(self.store.path, self.failures)
        return self.written


def _fill_shard(block: ShardBlock, members, outcome: dict[int, Any], sources: dict[str, str], ran: str) -> None:
    for i, (row, request) in enumerate(members):
        result, source = outcome[i], sources.get(request.key, "")
        if isinstance(result, SystemFailure):
            log.warning("%s (%s): not extracted (environment error): %s", request.key, request.path, result.reason)
        elif isinstance(result, Failure):
            log.warning("%s (%s): failed: %s", request.key, request.path, result.reason)
            block.set_failed(row, request, result.reason, source=source)
        else:
            features, video = result
            block.set_done(row, request, features, source=source, ran=ran, note=_note(video.info))
