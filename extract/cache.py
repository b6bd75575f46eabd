"""A feature cache shared by several projects: compute a video's features once per feature set.

**Feature set.** Its identity is the store fingerprint of :mod:`extract.run`
(:func:`feature_set_id`): sha256 over the canonical JSON of everything that changes the numbers -
every extractor's name, code version, weights digest (sha256, or "random" + seed), preprocessing
and sampling, the precision and the store schema version. Chunk, shard and codec choices, workers,
batch sizes and the device are recorded in the store (``layout``, ``extractor``) but are not part
of it.

**Cache root.** ``store.cache_root`` in pipeline.yaml (default ``data/cache``); the environment
variable ``AVEL_CACHE`` overrides it, so several projects can point at one folder. Layout::

    <cache root>/<feature set id>/features.zarr     a feature store (same contract), one row per
                                                    video CONTENT, ids = content keys

**Content keys.** A row of the cache is keyed by what the video IS, not by its name:
``sha256:<hex digest of the file's bytes>@<window start>+<window duration or "full">``
(:func:`content_key`). Two folders holding different files under the same name never collide; the
same file under two names (or in two projects) is computed once.

**Using it** (:func:`extract_with_cache`, ``avel-extract --cache``): every requested video is
hashed and looked up in the cache of the run's feature set; the misses (and only they) are
extracted into the cache store (by :func:`extract.run.run_extraction`, or on a Dask cluster by
:func:`extract.distributed.run_extraction_dask`); then the project's own store (``store.path``,
ids = the manifest's keys, as without a cache) is filled by copying the rows from the cache, shard
by shard, by this process only. Files that cannot be read (missing, empty, unreadable) cannot be
hashed: they are failed in the project store and not cached.

**Several projects at once.** The cache's lock (:class:`extract.core.lock.StoreLock`) is held only for
moments: to grow the cache, to claim rows, to verify it. The rows a run computes are **claimed**
(:class:`extract.core.lock.RowClaim`: a record of host, PID and command, and a flock that dies with the
process), so projects that want other videos compute at the same time, writing their rows into
the cache's shards under each shard's lock (read, change and write inside the lock), fenced by
their claim. A run that needs rows another live run is computing is refused before it computes
anything (exit 2, naming the claimant), or with ``--wait`` computes the rest, waits for that claim
(saying for whom), copies what it computed and computes itself what it left undone (a failure, or
a claimant that died). The last run to finish verifies what was written since the cache was last
complete (``unverified_shards``) and marks it complete.

**Complete.** A store is marked ``complete: true`` (root attribute, with ``verified``) only after
:func:`verify_store` read it end to end: every row has a final status (done or failed), every
shard that holds a valid segment has its file in every feature array (valid features are never
all fill values, so a missing file means lost writes), and every shard of every array decodes. While rows are being
added the attribute is ``false``; readers (``avel-train``, :func:`require_complete`) refuse such a
store with a message that says how to finish it. (Zarr does not store chunks that equal the fill
value, so a missing feature chunk of a failed or silent video is not an error by itself.)

This module imports numpy and zarr (through :mod:`extract.core.store`) only; networks are built by the
runner that computes the misses.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .decode import DecodeError, VideoRequest
from .run import RunSummary
from .core.store import (
    STATUS_DONE,
    STATUS_FAILED,
    ArraySpec,
    FeatureStore,
    StoreError,
    open_store,
)

log = logging.getLogger(__name__)

__all__ = [
    "CACHE_ENV",
    "FEATURES_NAME",
    "cache_root",
    "store_specs",
    "feature_set_attrs",
    "feature_set_id",
    "feature_set_path",
    "file_sha256",
    "content_key",
    "verify_store",
    "mark_complete",
    "require_complete",
    "CacheSummary",
    "extract_with_cache",
    "list_cache",
    "format_cache_listing",
]

from .core.settings import CACHE_ENV  # noqa: E402  (the variable that overrides store.cache_root)
#: the store of a feature set inside ``<cache root>/<feature set id>/``
FEATURES_NAME = "features.zarr"


# ------------------------------------------------------------------------------------------
# identity


def cache_root(pipeline, explicit: str | os.PathLike | None = None) -> Path:
    """The cache folder: ``explicit`` > ``$AVEL_CACHE`` > ``store.cache_root`` (relative to
    pipeline.yaml's folder), by the one rule of :func:`extract.core.settings.cache_root`; a
    pipeline without one is a :class:`extract.core.store.StoreError`."""
    from .core.settings import ConfigError, cache_root as resolve_cache_root

    try:
        return resolve_cache_root(pipeline, explicit)
    except ConfigError as exc:
        raise StoreError(str(exc)) from None


def store_specs(cfg) -> list[ArraySpec]:
    """The per-row arrays a store of ``cfg`` has: ``valid`` and every extractor's arrays
    (from the configuration, no network built)."""
    from .extractors import get_extractor
    from .core.store import core_specs

    specs = [s for s in core_specs(cfg.segments) if s.name == "valid"]
    return specs + [s for name in cfg.extractors for s in get_extractor(name).specs_for(cfg)]


def feature_set_attrs(cfg) -> dict[str, Any]:
    """Store attributes of the feature set of ``cfg`` (``fingerprint``, ``fingerprint_fields``,
    ``extractor``, ``weights``, ``versions`` ...), as :func:`extract.run.store_attrs` makes them."""
    from .extractors import extractor_identity
    from .provenance import store_attrs

    return store_attrs(cfg, extractor_identity(cfg))


def feature_set_id(cfg) -> str:
    """The feature set's identity: the store fingerprint (hex) of ``cfg``."""
    return feature_set_attrs(cfg)["fingerprint"]


def feature_set_path(root: str | os.PathLike, set_id: str) -> Path:
    return Path(root) / set_id / FEATURES_NAME


from .weights import file_sha256  # noqa: E402  (one implementation: cached per path, mtime and size)


def content_key(request: VideoRequest, digest: str | None = None) -> str:
    """``sha256:<file digest>@<start>+<duration|full>``: the cache id of a video window."""
    digest = digest or file_sha256(request.path)
    duration = "full" if request.duration is None else f"{float(request.duration):g}"
    return f"sha256:{digest}@{float(request.start):g}+{duration}"


def _content_keys(requests: Sequence[VideoRequest]) -> tuple[dict[str, str], dict[str, str]]:
    """({request key: content key}, {request key: failure reason}) - files that cannot be read fail."""
    from .decode import _short, check_file

    keys, failures = {}, {}
    digests: dict[str, str] = {}
    for request in requests:
        try:
            check_file(request.path)
            real = os.path.realpath(request.path)
            if real not in digests:
                digests[real] = file_sha256(real)
            keys[request.key] = content_key(request, digests[real])
        except DecodeError as exc:
            failures[request.key] = _short(exc)
        except OSError as exc:
            failures[request.key] = f"cannot read the file: {exc}"
    return keys, failures


from .core.store import mark_complete, require_complete, verify_store  # noqa: E402,F401  (completeness is a store rule)


# ------------------------------------------------------------------------------------------
# extraction through the cache


@dataclasses.dataclass
class CacheSummary(RunSummary):
    """What :func:`extract_with_cache` did: the project store's counts (:class:`RunSummary`, each
    requested video once) plus ``reused`` = videos whose rows came from the cache and
    ``computed`` = videos extracted now (cache misses, and failed cache rows, never reused)."""

    cache: Path = Path()
    feature_set: str = ""
    reused: int = 0
    computed: int = 0
    run: Any = None
    now_label = "written now, from the cache"

    def text(self) -> str:
        lines = RunSummary.text(self).split("\n")
        lines[0] += f" (feature set {self.feature_set}, cache {self.cache})"
        lines.insert(1, f"  {self.requested} videos: {self.reused} reused from the cache, {self.computed} computed now")
        return "\n".join(lines)


def extract_with_cache(
    pipeline,
    requests: Sequence[VideoRequest],
    *,
    store_path: str | os.PathLike | None = None,
    root: str | os.PathLike | None = None,
    progress: bool = True,
    runner: Callable[..., Any] | None = None,
    retry_failed: bool = False,
    wait: bool = False,
) -> CacheSummary:
    """Fill the project store from the shared cache, computing only the videos it lacks.

    The project's rows to (re)fill are planned as without a cache (:func:`extract.run.plan_shards`:
    missing rows, rows whose file changed, and failed rows with ``retry_failed``). Their files are
    hashed; content the cache holds as done is copied, everything else is computed into the cache
    by ``runner(pipeline, requests, store_path=..., progress=..., retry_failed=True, claim=...)``
    (default :func:`extract.run.run_extraction`; a ``functools.partial`` of
    :func:`extract.distributed.run_extraction_dask` uses a cluster). **The cache holds successes
    only**: a failed cache row is never handed to a project, it is computed again by whoever asks
    for it; failures are the project's record (its store and ``logs/failures.jsonl``, with its own
    paths).

    **Several projects at once.** The project's own store is locked for the whole run (one run per
    project store). The cache is not: its lock is held only for moments (to grow it, to claim rows,
    to verify it), and the rows this run computes are **claimed** (:class:`extract.core.lock.RowClaim`,
    recording host, PID and command), so projects that need other videos compute at the same time,
    and no row is computed by two projects at once. Rows another live run has claimed are not
    computed here: without ``wait`` the run is refused before anything is computed
    (:class:`extract.core.lock.StoreLocked`, naming the claimant: exit 2); with ``wait`` it computes the
    rest, then waits for those claims (saying for whom) and copies what they computed - or
    computes itself what they left undone (failed, or their process died: a dead process's claim
    ends with it). Every row is read out of the cache under its cache shard's lock and written into
    the project store under the project shard's lock and lease.
    """
    from .extractors import resolve_device
    from .prepare import check_existing_store, ensure_store, open_run_store
    from .provenance import effective_config
    from .requests import distinct_requests
    from .run import close_run, count_outcomes, plan_shards

    started = time.monotonic()
    cfg = effective_config(pipeline.extract, resolve_device(pipeline.extract.device))
    requests = distinct_requests(requests, allow_empty=True)
    project = Path(os.path.abspath(store_path if store_path is not None else pipeline.path(pipeline.store.path)))
    attrs = feature_set_attrs(cfg)
    set_id = attrs["fingerprint"]
    check_existing_store(project, attrs, cfg.segments)  # other settings: refused before any work
    cache_path = feature_set_path(os.path.abspath(cache_root(pipeline, root)), set_id)
    specs = store_specs(cfg)
    project_attrs = {**attrs, "cache": {"path": str(cache_path), "feature_set": set_id}}
    with open_run_store(project, [r.key for r in requests], cfg.segments, specs, attrs, pipeline.store,
                        create_attrs=project_attrs, wait=wait) as store:
        plan = plan_shards(store, requests, retry_failed)
        summary = CacheSummary(**dataclasses.asdict(plan.start_summary(project, len(requests))),
                               cache=cache_path, feature_set=set_id)
        wanted = [request for _, members in plan.shards for _, request in members]
        keys, unreadable = _content_keys(wanted)
        cache_requests = list({keys[r.key]: VideoRequest(keys[r.key], r.path, r.start, r.duration)
                               for r in wanted if r.key in keys}.values())
        cache = None
        if cache_requests:
            cache_attrs = {**attrs, "cache": {"keys": "sha256 of the file bytes @ window start + duration"},
                           "complete": False}
            ensure_store(cache_path, [r.key for r in cache_requests], cfg.segments, specs, cache_attrs, pipeline.store)
            computed, runs = _fill_cache(pipeline, cache_path, cache_requests, attrs, runner or _default_runner,
                                         progress, wait)
            summary.reused = sum(1 for r in wanted if r.key in keys and keys[r.key] not in computed)
            summary.computed = int(sum(run.done + run.failed for run in runs))
            summary.run = runs[-1] if runs else None
            summary.systemic = next((run.systemic for run in runs if run.systemic), "")
            _finish_cache(cache_path)
            cache = open_store(cache_path)
        if plan.shards:
            store.set_attrs(complete=False, verified=None, cache=project_attrs["cache"])
        for shard, members in plan.shards:
            outcome = _copy_shard(store, shard, [r for _, r in members], keys, unreadable, cache, plan.sources)
            count_outcomes(summary, plan, outcome)
        return close_run(store, requests, summary, started, [shard for shard, _ in plan.shards])


def _default_runner(pipeline, requests, *, store_path, progress, retry_failed=False, claim=None):
    from .run import run_extraction

    return run_extraction(pipeline, requests, store_path=store_path, progress=progress, retry_failed=retry_failed,
                          claim=claim)


#: seconds a run without ``--wait`` tries to take the cache's lock before it is refused: the lock
#: is only held for moments (growing the cache, claiming rows, verifying it), unless an older avel
#: or a plain ``avel-extract --store <cache>`` holds it for a whole extraction
CACHE_LOCK_PATIENCE_S = 120.0


def _cache_lock(cache_path: Path, wait: bool):
    from .core.lock import StoreLock

    return StoreLock(cache_path, wait=wait, patience_s=CACHE_LOCK_PATIENCE_S)


def _fill_cache(pipeline, cache_path: Path, cache_requests: list[VideoRequest], attrs: dict, runner: Callable,
                progress: bool, wait: bool) -> tuple[set[str], list]:
    """Make every requested content key final in the cache: claim and compute the ones nobody
    computes (done rows are reused), and with ``wait`` wait for the ones other runs are computing,
    then compute what they left undone. Returns (the keys this run computed, the runners' summaries)."""
    from .core.lock import describe, wait_for_claim

    by_key = {r.key: r for r in cache_requests}
    pending = list(by_key)
    computed: set[str] = set()
    runs = []
    while pending:
        claim, others = _claim_rows(pipeline, cache_path, pending, attrs, wait)
        if claim is not None:
            try:
                run = runner(pipeline, [by_key[k] for k in claim.keys], store_path=cache_path, progress=progress,
                             retry_failed=True, claim=claim)
            finally:
                claim.release()
            runs.append(run)
            computed.update(claim.keys)
            if run.systemic:
                break
        for record, keys in others:
            log.warning("%s: waiting for %d videos that another avel-extract is computing into the cache: %s (--wait)",
                        cache_path, len(keys), describe(record))
            wait_for_claim(cache_path, record)
            log.warning("%s: that run (pid %s) has ended", cache_path, record.get("pid"))
        # what the others left undone (failed, or their process died) is computed by this run
        pending = [k for _, keys in others for k in keys if k not in computed]
    return computed, runs


def _claim_rows(pipeline, cache_path: Path, keys: Sequence[str], attrs: dict, wait: bool):
    """Under the cache's lock: grow the cache by the keys it lacks and claim every key of ``keys``
    that is not done and that no live run claims. Returns (the claim, or None when nothing is to
    compute; [(live claim record, the keys of ``keys`` it holds)]). Without ``wait``, keys that
    another live run holds refuse the run (:class:`extract.core.lock.StoreLocked`) before anything is
    changed."""
    from .core.lock import RowClaim, StoreLocked, describe, live_claims
    from .prepare import check_identity, grow_store
    from .core.store import check_arrays

    cfg = pipeline.extract
    specs = store_specs(cfg)
    with _cache_lock(cache_path, wait):
        store = open_store(cache_path, mode="r+")
        check_identity(store, attrs, cfg.segments)
        store.repair_growth()
        check_arrays(store, specs)
        present = set(store.ids.tolist())
        status = store.status()
        need = [k for k in keys if k not in present or status[store.row_of(k)] != STATUS_DONE]
        held: dict[str, dict] = {}
        for record in live_claims(cache_path):
            held.update((k, record) for k in record.get("keys", ()))
        others: dict[str, tuple[dict, list[str]]] = {}
        for key in need:
            if key in held:
                others.setdefault(held[key]["token"], (held[key], []))[1].append(key)
        if others and not wait:
            n = sum(len(ks) for _, ks in others.values())
            who = "; ".join(describe(record) for record, _ in list(others.values())[:3])
            raise StoreLocked(
                f"{cache_path}: {n} of the videos this run needs are being computed into the shared feature cache by "
                f"another avel-extract ({who}); nothing was computed. Pass --wait to compute the other videos now and "
                "then wait for those (their rows are then copied from the cache, not computed twice), or run again "
                f"when it has finished (claims in {cache_path / 'logs' / 'claims'})")
        free = [k for k in need if k not in held]
        claim = None
        if free:
            new = [k for k in free if k not in present]
            was_complete = store.attrs.get("complete") is True
            unverified = [] if was_complete else store.attrs.get("unverified_shards")
            grow_store(store, new)
            shards = {store.shard_of(store.row_of(k)) for k in free}
            store.set_attrs(complete=False, verified=None,
                            unverified_shards=None if unverified is None else sorted(set(unverified) | shards))
            claim = RowClaim(cache_path, free).acquire()
        log.info("%s: %d of %d videos are cached, %d to compute now, %d being computed by other runs", cache_path,
                 len(keys) - len(need), len(keys), len(free), len(need) - len(free))
        return claim, list(others.values())


def _finish_cache(cache_path: Path) -> None:
    """Verify what was written into the cache since it was last complete and mark it complete
    (:func:`extract.core.store.mark_complete`), unless another run still computes into it (the last
    one verifies) or its lock is not to be had (a later run verifies)."""
    from .core.lock import StoreLocked, live_claims

    try:
        with _cache_lock(cache_path, wait=False):
            if live_claims(cache_path):
                return
            cache = open_store(cache_path, mode="r+")
            if cache.attrs.get("complete") is True:
                return
            unverified = cache.attrs.get("unverified_shards")
            if not mark_complete(cache, unverified):
                cache.set_attrs(unverified_shards=[])
    except StoreLocked as exc:
        log.info("the cache is verified by a later run: %s", exc)


def _read_cache_rows(cache: FeatureStore, keys: Sequence[str], names: Sequence[str]) -> dict[str, dict]:
    """``{content key: {"status", "reason", "ran", "features": {name: row}}}``, each cache shard read
    under its shard lock (never half rewritten by a writer of that shard)."""
    from .core.lock import shard_lock

    rows = {key: cache.row_of(key) for key in dict.fromkeys(keys)}
    by_shard: dict[int, list[str]] = {}
    for key, row in rows.items():
        by_shard.setdefault(cache.shard_of(row), []).append(key)
    out: dict[str, dict] = {}
    for shard, shard_keys in sorted(by_shard.items()):
        index = [rows[k] for k in shard_keys]
        lo = cache.shard_rows(shard).start
        with shard_lock(cache.path, shard):
            hi = lo + cache.rows_per_shard
            status = np.asarray(cache.group["status"][lo:hi], dtype=np.int8)
            reason = cache.group["reason"][lo:hi].tolist()
            ran = cache.group["ran"][lo:hi].tolist() if "ran" in cache.group else [""] * len(status)
            features = {name: cache.read(name, index) for name in names}
        for i, key in enumerate(shard_keys):
            local = rows[key] - lo
            out[key] = {"status": int(status[local]), "reason": str(reason[local]), "ran": str(ran[local]),
                        "features": {name: features[name][i] for name in names}}
    return out


def _copy_shard(store: FeatureStore, shard: int, members: list[VideoRequest], keys: dict[str, str],
                unreadable: dict[str, str], cache: FeatureStore | None, sources: dict[str, str]) -> dict[str, int]:
    """Write the project rows of ``members`` from the cache (done rows) or as failed (the cache
    row failed now, or the file could not be read); other rows of the shard are kept. Returns
    ``{key: status written}``; a member whose cache row is still missing is left as it was."""
    from .run import ShardBlock

    cached = [r for r in members if r.key in keys]
    names = store.feature_names()
    rows = _read_cache_rows(cache, [keys[r.key] for r in cached], names) if cached else {}
    with ShardBlock(store, shard) as block:
        for request in cached:
            row, source, got = store.row_of(request.key), sources.get(request.key, ""), rows[keys[request.key]]
            if got["status"] == STATUS_DONE:
                block.set_done(row, request, got["features"], source=source, ran=got["ran"], note=got["reason"])
            elif got["status"] == STATUS_FAILED:
                block.set_failed(row, request, got["reason"], source=source)
            # still missing (environment error, lost task): the row stays as it was
        for request in members:
            if request.key in unreadable:
                block.set_failed(store.row_of(request.key), request, unreadable[request.key],
                                 source=sources.get(request.key, ""))
        return block.commit()


# ------------------------------------------------------------------------------------------
# listing


def _size_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def list_cache(root: str | os.PathLike) -> list[dict[str, Any]]:
    """One entry per feature set under ``root``: id, path, size, video counts, completeness and
    how it was made (extractors with weights, segments, frames per segment, image size,
    precision, package versions, creation time)."""
    root = Path(root)
    entries = []
    for path in sorted(root.glob(f"*/{FEATURES_NAME}")):
        entry: dict[str, Any] = {"feature_set": path.parent.name, "path": str(path), "bytes": _size_bytes(path)}
        try:
            store = open_store(path)
        except StoreError as exc:
            entry["error"] = str(exc)
            entries.append(entry)
            continue
        attrs = store.attrs
        fields = attrs.get("extractor") or {}  # the resolved extract section that made it
        extractors = attrs.get("extractors") or {}
        entry.update(
            videos=len(store), **store.summary(), complete=bool(attrs.get("complete")), verified=attrs.get("verified"),
            created=attrs.get("created"), versions=attrs.get("versions"),
            made_with={
                "extractors": {name: _weights_label(ident.get("weights")) for name, ident in extractors.items()},
                **{k: fields.get(k) for k in ("segments", "frames_per_segment", "image_size", "resize", "precision")},
            },
        )
        entries.append(entry)
    return entries


def _weights_label(weights: Any) -> str:
    """``"vgg19=imagenet(sha256 0123abcd...)"``-style summary of an extractor's weights identity."""
    if not isinstance(weights, dict):
        return str(weights)
    parts = []
    for name, ident in weights.items():
        if not isinstance(ident, dict):
            continue
        sha = str(ident.get("sha256") or "")  # None: a known file's logical identity (extract.weights)
        label = ident.get("name") or ident.get("source") or ""
        parts.append(f"{name}={label}({sha[:12]}{'...' if len(sha) > 12 else ''})" if label else f"{name}({sha[:12]})")
    return ", ".join(parts) or "-"


def format_cache_listing(entries: Sequence[dict[str, Any]], root: str | os.PathLike) -> str:
    """Human-readable listing of :func:`list_cache`."""
    if not entries:
        return f"no feature sets in {root}"
    lines = [f"feature cache {root}: {len(entries)} feature sets"]
    for e in entries:
        if "error" in e:
            lines.append(f"- {e['feature_set']}: unreadable: {e['error']}")
            continue
        made = e["made_with"]
        state = "complete" if e["complete"] else "INCOMPLETE"
        lines.append(
            f"- {e['feature_set']}  {state}  {e['videos']} videos (done {e['done']}, failed {e['failed']}, "
            f"missing {e['missing']})  {e['bytes'] / 1e6:.1f} MB  created {e['created']}")
        lines.append("    extractors: " + "; ".join(f"{k}: {v}" for k, v in made["extractors"].items()))
        lines.append(
            f"    T={made['segments']} frames/segment={made['frames_per_segment']} image={made['image_size']} "
            f"({made['resize']}) precision={made['precision']}  path {e['path']}")
    return "\n".join(lines)
