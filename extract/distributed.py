"""``avel-extract`` over Dask: one task per store shard, on a LocalCluster or an existing cluster.

Where the work runs (``--scheduler`` / ``dask.scheduler`` in pipeline.yaml):

- not set: the single-machine path of :mod:`extract.run` (decode worker pool + one process that
  holds the networks). It stays the default because on one machine a LocalCluster adds nothing:
  every worker process would load its own copy of the networks and decode serially, while the
  single-machine path already decodes on all cores and batches the networks across a shard;
- ``local``: an embedded :class:`distributed.LocalCluster` whose scheduler, workers, nannies and
  dashboard all listen on 127.0.0.1 only (random ports), ``dask.n_workers`` processes (default:
  one per GPU with ``extract.device`` cuda, else one per ``dask.threads_per_worker`` cores);
- ``slurm``: worker jobs submitted to SLURM through dask-jobqueue (:mod:`extract.core.slurm`, section
  ``dask.slurm``): checked before any job is queued, jobs that end early replaced, every job
  cancelled at the end; on a CPU each task uses ``dask.slurm.cores`` torch threads;
- ``tcp://host:8786``: an existing scheduler;
- ``tls://host:8786``: the same with Dask's TLS security, certificates from ``dask.tls_ca_file``,
  ``dask.tls_client_cert``, ``dask.tls_client_key`` or from Dask's own configuration/environment
  (``DASK_DISTRIBUTED__COMM__TLS__CA_FILE``, ``..._CLIENT__CERT``, ``..._CLIENT__KEY``).

**Writes are safe by construction.** The driver (this process) creates the store, grows it,
writes its attributes and holds its lock (:mod:`extract.core.lock`); it then plans the work as
:class:`ShardJob` objects, one per store shard that has missing requested rows
(:func:`plan_jobs` checks that no shard is given to two jobs). A task owns shard k of EVERY array:
under the shard's lock, and only while its run's fence (lease, or the cache claim) holds, it reads
the shard, sets its requested rows and writes the shard whole, status last
(:func:`extract.run.finish_shard`). Zarr 3 rewrites a whole shard on every write, so two writers
on one shard lose rows (``tests/test_distributed.py`` shows it); one writer per shard never does.

**Fault tolerance.** A task that raises is retried ``dask.retries`` times (Dask ``retries``). A
task whose worker dies (killed, out of memory, node lost) is rescheduled by the scheduler and
counts against ``distributed.scheduler.allowed-failures`` (default 3), not against the retries.
A rescheduled task recomputes its shard from scratch (decode and networks are deterministic and a
video's numbers never depend on its neighbours), and a task whose shard is already finished (the
status array is the resume marker: an attempt wrote it, then its worker died before reporting)
returns at once. So the store ends bit-identical to a single-process run's. A task that is lost
for good leaves its rows "missing": the summary says so, the exit code is 1 and running the same
command again computes just those shards.

**Decoding** runs inside the task (one video after the other, in a daemon thread): a decode
that takes longer than ``extract.decode_timeout_s`` is abandoned and its video failed, so a hung
decoder never blocks a task (the thread cannot be killed; it may keep a core busy until the
worker exits). Parallel decoding comes from running many workers.

**Workers.** The networks are built once per worker process and kept for later tasks
(:func:`worker_extractors`, a per-process cache keyed by the extraction settings and device).
With ``extract.device`` ``cuda``/``cuda:N`` every task asks for the resource ``GPU=1``: start one
worker per GPU with one thread and ``--resources GPU=1`` (``dask worker ... --nthreads 1
--resources GPU=1``; dask-cuda's ``dask cuda worker`` pins one GPU per worker).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence

from .decode import DecodeError, Failure, VideoRequest, decode_video
from .core.settings import ConfigError, fingerprint, to_dict

log = logging.getLogger(__name__)

__all__ = [
    "ShardJob",
    "ShardResult",
    "plan_jobs",
    "extract_shard",
    "worker_extractors",
    "security_from_config",
    "dask_client",
    "run_extraction_dask",
    "LOCAL",
]



# ------------------------------------------------------------------------------------------
# the unit of work


@dataclasses.dataclass(frozen=True)
class ShardJob:
    """Everything a worker needs to compute and write shard ``shard`` of the store at ``store``.

    ``members`` = the requested ``(row, request)`` pairs of the shard, sorted by row; ``cfg`` the
    :class:`~extract.config.ExtractConfig`; ``decode_fn(request, grids, segments, audio)`` decodes
    one video (picklable). ``threads`` = torch threads per worker on CPU.
    """

    store: str
    shard: int
    members: tuple[tuple[int, VideoRequest], ...]
    cfg: Any
    device: str
    decode_fn: Callable = decode_video
    threads: int = 1
    #: the run's fence: its lease token, or ``claim:<token>`` in the shared cache; the shard is
    #: written only while it holds (:func:`extract.core.lock.fence_holds`); a job without one writes nothing
    lease: str = ""
    #: ``(key, file identity)`` of the members, recorded in the ``source`` row record
    sources: tuple[tuple[str, str], ...] = ()
    #: some member was final (done/failed) at planning: computed again on purpose (changed file,
    #: --retry-failed), so "every member is final" does not mean an earlier attempt finished it
    recompute: bool = False


@dataclasses.dataclass
class ShardResult:
    """What a shard task reports back to the driver."""

    shard: int
    done: int
    failed: int
    #: True when the shard was already finished (resume marker) and nothing was computed
    already: bool
    #: ``pid@host`` of the worker process
    worker: str
    #: how many times this worker process has built the networks so far (1 = loaded once)
    model_loads: int
    seconds: float
    #: ``{key: status written}`` (None: a newer run owns the store, nothing was written)
    written: dict | None = None
    #: per member in row order: ``(key, reason of an environment error or None)``
    events: tuple = ()


def plan_jobs(store, requests: Sequence[VideoRequest], cfg, device: str, decode_fn: Callable = decode_video,
              threads: int = 1, retry_failed: bool = False, lease: str = ""):
    """One :class:`ShardJob` per shard with rows to compute, and the :class:`extract.run.Plan`
    (skipped, retried and changed rows). Raises ``RuntimeError`` if the plan would give one shard
    (or one row) to two jobs or put a row into a shard it does not belong to (one writer per shard)."""
    from .run import plan_shards

    plan = plan_shards(store, requests, retry_failed)
    recomputed = plan.changed | plan.retried  # the members that were final (done/failed) at planning
    jobs = [ShardJob(str(store.path), shard, tuple(members), cfg, device, decode_fn, threads, lease,
                     tuple((r.key, plan.sources.get(r.key, "")) for _, r in members),
                     any(r.key in recomputed for _, r in members))
            for shard, members in plan.shards]
    check_one_writer_per_shard(jobs, store.rows_per_shard)
    return jobs, plan


def check_one_writer_per_shard(jobs: Sequence[ShardJob], rows_per_shard: int) -> None:
    """The rule that keeps concurrent writes safe: every shard and row in at most one job, and
    every row of a job inside that job's shard."""
    shards = [job.shard for job in jobs]
    if len(set(shards)) != len(shards):
        dup = sorted({s for s in shards if shards.count(s) > 1})
        raise RuntimeError(f"task plan gives shards {dup} to more than one task")
    rows = [row for job in jobs for row, _ in job.members]
    if len(set(rows)) != len(rows):
        raise RuntimeError("task plan gives a row to more than one task")
    for job in jobs:
        outside = [row for row, _ in job.members if row // rows_per_shard != job.shard]
        if outside:
            raise RuntimeError(f"task for shard {job.shard} holds rows {outside} of other shards")


# ------------------------------------------------------------------------------------------
# worker side

#: per worker process: settings key -> extractors (networks loaded once per process)
_EXTRACTORS: dict[str, list] = {}
_MODEL_LOADS = 0
#: held while the extractors are looked up or built: a worker with several threads builds them once
_BUILD_LOCK = threading.Lock()


def _settings_key(cfg, device: str) -> str:
    return fingerprint({"extract": to_dict(cfg), "device": device})


def worker_extractors(cfg, device: str, threads: int = 1) -> list:
    """The extractors of ``cfg`` on ``device``, built on first use in this process and then reused.

    On CPU torch is limited to ``threads`` threads (one worker = one core's share by default).
    The build holds a process-wide lock, so the tasks of a worker with several threads
    (``dask.threads_per_worker`` > 1) that start together build the networks once, not once each.
    """
    global _MODEL_LOADS
    device = worker_device(device)
    key = _settings_key(cfg, device)
    with _BUILD_LOCK:
        cached = _EXTRACTORS.get(key)
        if cached is None:
            import torch

            from .extractors import build_extractors, resolve_device

            if not resolve_device(device).startswith("cuda"):
                torch.set_num_threads(max(1, int(threads)))
            cached = build_extractors(cfg, device)
            _EXTRACTORS.clear()  # one feature set per worker at a time: free the previous networks
            _EXTRACTORS[key] = cached
            _MODEL_LOADS += 1
            log.info("worker %s: built extractors %s on %s", _worker_name(), [e.name for e in cached], device)
    return cached


def worker_device(device: str) -> str:
    """``cuda`` inside Dask worker number k on a machine with n > 1 visible GPUs -> ``cuda:{k % n}``
    (so an embedded LocalCluster with one worker per GPU spreads over the GPUs); anything else,
    and workers that see one GPU (e.g. pinned with CUDA_VISIBLE_DEVICES), unchanged."""
    if device != "cuda":
        return device
    try:
        from distributed import get_worker

        name = get_worker().name
    except (ImportError, ValueError):
        return device
    import torch

    count = torch.cuda.device_count()
    return f"cuda:{name % count}" if isinstance(name, int) and count > 1 else device


def _worker_name() -> str:
    return f"{os.getpid()}@{socket.gethostname()}"


def _decode_one(decode_fn: Callable, request: VideoRequest, grids, segments: int, audio: bool,
                timeout_s: float | None = None):
    """``decode_fn`` or a :class:`Failure` with the same reason text the decode pool gives.

    The decode runs in a daemon thread; one that takes longer than ``timeout_s`` is abandoned
    (a thread cannot be killed: it may go on using a core until the worker exits) and the video
    is failed, so a hung decoder never blocks the task.
    """
    import threading

    from .decode import _short

    outcome: list = []

    def target():
        try:
            outcome.append(decode_fn(request, grids, segments, audio))
        except DecodeError as exc:
            outcome.append(Failure(_short(exc)))
        except BaseException as exc:  # noqa: BLE001 - every failure becomes a reason
            outcome.append(Failure(f"{type(exc).__name__}: {_short(exc)}"))

    thread = threading.Thread(target=target, name=f"avel-decode-{request.key}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if not outcome:
        log.warning("%s: decode ran over %g s; abandoned", request.key, timeout_s)
        return Failure(f"decode timed out after {timeout_s:g} s (abandoned in a Dask worker)")
    return outcome[0]


def extract_shard(job: ShardJob) -> ShardResult:
    """The task: decode and compute the requested rows of one shard, write the shard whole.

    Returns at once (``already=True``) when every requested row of the shard is already done or
    failed in the store - an earlier attempt finished it before its worker died.
    """
    from .run import decode_inputs, finish_shard
    from .core.store import STATUS_DONE, STATUS_FAILED, STATUS_MISSING, open_store

    from .run import as_system_failure

    started = time.monotonic()
    store = open_store(job.store, mode="r+")
    _record_attempt(job)
    rows = [row for row, _ in job.members]
    status = store.status()
    if not job.recompute and all(status[row] != STATUS_MISSING for row in rows):
        return ShardResult(job.shard, int(sum(status[r] == STATUS_DONE for r in rows)),
                           int(sum(status[r] == STATUS_FAILED for r in rows)), True, _worker_name(), _MODEL_LOADS,
                           time.monotonic() - started)
    extractors = worker_extractors(job.cfg, job.device, job.threads)
    grids, audio = decode_inputs(extractors)
    timeout = float(job.cfg.decode_timeout_s) if job.cfg.decode_timeout_s else None
    decoded = [as_system_failure(_decode_one(job.decode_fn, request, grids, job.cfg.segments, audio, timeout))
               for _, request in job.members]
    written = finish_shard(store, job.shard, list(job.members), decoded, extractors, job.cfg.segments,
                           sources=dict(job.sources), lease=job.lease)
    # rows not written are environment errors (decode or compute): the driver's guard counts them
    events = tuple((request.key, None if written is None or request.key in written else
                    (result.reason if isinstance(result, Failure) else "not extracted (environment error)"))
                   for (_, request), result in zip(job.members, decoded))
    done = sum(1 for v in (written or {}).values() if v == STATUS_DONE)
    failed = sum(1 for v in (written or {}).values() if v == STATUS_FAILED)
    return ShardResult(job.shard, done, failed, False, _worker_name(), _MODEL_LOADS, time.monotonic() - started,
                       written, events)


ATTEMPTS_FILE = "attempts.log"


def _record_attempt(job: ShardJob) -> None:
    """One line per task attempt (``<lease> <shard> <worker>``): the driver counts reschedules."""
    from .core.lock import log_dir

    if not job.lease:
        return
    try:
        with open(log_dir(job.store) / ATTEMPTS_FILE, "a") as fh:
            fh.write(f"{job.lease} {job.shard} {_worker_name()}\n")
    except OSError as exc:  # bookkeeping only
        log.debug("could not record the attempt: %s", exc)


def count_reschedules(store_path, lease: str) -> int:
    """Shard tasks of the run with ``lease`` that were started more than once."""
    from .core.lock import LOG_GROUP

    try:
        lines = (Path(store_path) / LOG_GROUP / ATTEMPTS_FILE).read_text().splitlines()
    except OSError:
        return 0
    shards = [line.split()[1] for line in lines if line.startswith(lease + " ")]
    return len(shards) - len(set(shards))


from .core.daskclient import (LOCAL, LOOPBACK, SLURM, _check_on_worker, check_workers, dask_client,  # noqa: E402,F401
                         security_from_config)  # (re-exported)


# ------------------------------------------------------------------------------------------
# driver


def _wants_gpu(device: str) -> bool:
    return str(device).startswith("cuda")


def run_extraction_dask(
    pipeline,
    requests: Sequence[VideoRequest],
    *,
    store_path: str | os.PathLike | None = None,
    client=None,
    scheduler: str | None = None,
    progress: bool = True,
    decode_fn: Callable = decode_video,
    on_result: Callable[[ShardResult, Any], None] | None = None,
    retry_failed: bool = False,
    wait: bool = False,
    claim=None,
):
    """Extract ``requests`` into the store with one Dask task per shard; returns a
    :class:`extract.run.RunSummary`. ``claim``: as in :func:`extract.run.run_extraction` (the
    shared cache: the tasks are fenced by the caller's claim on the rows).

    Everything that can be checked is checked before the store is created or touched: the
    scheduler address and whether it answers (``dask.connect_timeout``), an existing store's
    settings, and on every worker (``Client.run``) that the videos are readable and the store's
    folder writable there (paths are absolute: workers run in other folders). ``client`` = an
    existing :class:`distributed.Client` (else one from :func:`dask_client`; an embedded
    ``local`` cluster is only started when there is work); ``on_result(result, client)`` is called
    in the driver after each finished task (tests use it to kill a worker in the middle of a run).
    The driver loads no network: the store identity comes from the configuration.
    """
    from .cache import store_specs
    from .extractors import extractor_identity, resolve_device
    from .prepare import check_existing_store, open_claimed_store, open_run_store
    from .provenance import effective_config, store_attrs
    from .requests import distinct_requests
    from .run import close_run

    started = time.monotonic()
    store_cfg = pipeline.store
    address = scheduler or pipeline.dask.scheduler or LOCAL
    extract_cfg = pipeline.extract
    if address == SLURM:  # auto = the compute nodes' device (a GPU when the jobs ask for one), not this machine's
        from .core.slurm import slurm_device

        extract_cfg = dataclasses.replace(extract_cfg, device=slurm_device(extract_cfg.device, pipeline.dask.slurm))
    cfg = effective_config(extract_cfg, resolve_device(extract_cfg.device))
    path = Path(os.path.abspath(store_path if store_path is not None else pipeline.path(store_cfg.path)))
    requests = distinct_requests(requests, allow_empty=True)  # first wins, as in extract.run
    attrs = store_attrs(cfg, extractor_identity(cfg))
    specs = store_specs(cfg)
    check_existing_store(path, attrs, cfg.segments)
    with contextlib.ExitStack() as stack:
        if client is None and address != LOCAL:  # a remote cluster: reach it and check its workers first
            client = stack.enter_context(dask_client(pipeline.dask, address, gpu=_wants_gpu(cfg.device),
                                                     resolve_path=pipeline.path, stage="extract"))
        if client is not None:
            check_workers(client, [r.path for r in requests], [path.parent])
        keys = [r.key for r in requests]
        opened = (open_claimed_store(path, keys, cfg.segments, attrs, claim) if claim is not None
                  else open_run_store(path, keys, cfg.segments, specs, attrs, store_cfg, wait=wait))
        with opened as store:
            jobs, plan = plan_jobs(store, requests, cfg, cfg.device, decode_fn, torch_threads(pipeline.dask, address),
                                   retry_failed, store.lease)
            if address == SLURM and 0 < len(jobs) < pipeline.dask.slurm.jobs:
                log.warning("%d shard tasks for %d SLURM worker jobs: %d jobs have nothing to do (a shard is the unit "
                            "of work: a smaller store.rows_per_shard, set when the store is made, spreads the work)",
                            len(jobs), pipeline.dask.slurm.jobs, pipeline.dask.slurm.jobs - len(jobs))
            if client is None and jobs:
                client = stack.enter_context(dask_client(pipeline.dask, address, gpu=_wants_gpu(cfg.device),
                                                         resolve_path=pipeline.path))
            summary = _run_jobs(client, store, jobs, plan, requests, pipeline.dask, progress, on_result)
            return close_run(store, requests, summary, started, [job.shard for job in jobs])


def torch_threads(dask_cfg, address: str) -> int:
    """torch threads of one task on a CPU: ``dask.threads_per_worker`` (one core per task), or on
    SLURM the job's cores shared by its task threads (``dask.slurm.cores // threads_per_worker``)."""
    per_worker = max(1, int(dask_cfg.threads_per_worker))
    if address == SLURM:
        return max(1, int(dask_cfg.slurm.cores) // per_worker)
    return per_worker


def _run_jobs(client, store, jobs: list[ShardJob], plan, requests, dask_cfg, progress: bool, on_result):
    from .core.progress import progress_bar
    from .run import SystemFailure, SystemicError, SystemicGuard, count_outcomes

    summary = plan.start_summary(store.path, len(requests))
    summary.workers = {}  # type: ignore[attr-defined]  worker -> model loads
    total = sum(len(job.members) for job in jobs)
    log.info("%s: %d videos to extract in %d shard tasks, %d already done", store.path, total, len(jobs), plan.skipped)
    if not jobs:
        return summary
    from distributed import as_completed

    if not store.shared:
        store.set_attrs(complete=False, verified=None)
    token = uuid.uuid4().hex[:8]
    resources = {"GPU": 1} if _wants_gpu(jobs[0].device) else None
    workers_before = set(client.scheduler_info().get("workers", {}))
    futures = {}
    for job in jobs:
        future = client.submit(extract_shard, job, key=f"avel-shard-{job.shard}-{token}", pure=False,
                               retries=dask_cfg.retries, resources=resources)
        futures[future.key] = (future, job)
    steady = time.monotonic()
    bar = progress_bar(total, progress, "extract")
    guard = SystemicGuard()
    try:
        for future in as_completed([f for f, _ in futures.values()]):
            job = futures[future.key][1]
            try:
                result: ShardResult = future.result()
            except Exception as exc:  # noqa: BLE001 - a task lost for good (retries / allowed-failures spent)
                log.error("shard %d (%d videos) could not be extracted: %s: %s; its rows stay missing, run "
                          "again to retry them", job.shard, len(job.members), type(exc).__name__, exc)
                bar.update(len(job.members))
                continue
            for key, reason in result.events:
                guard.observe(key, SystemFailure(reason) if reason else None)
            written = result.written
            if written is None and result.already and not job.recompute:
                # planned as missing, final when the task ran: an earlier attempt of this run wrote
                # the shard and its result was lost with its worker (the scheduler ran the task
                # again); count the rows it wrote, as read back from the store
                status = store.status()
                written = {request.key: int(status[row]) for row, request in job.members}
            count_outcomes(summary, plan, written or {})
            summary.workers[result.worker] = max(result.model_loads, summary.workers.get(result.worker, 0))  # type: ignore[attr-defined]
            bar.update(len(job.members))
            bar.set_postfix(failed=summary.failed, refresh=False)
            if on_result is not None:
                on_result(result, client)
    except SystemicError as exc:
        summary.systemic = str(exc)
        log.error("%s", exc)
        client.cancel([f for f, _ in futures.values()])
    finally:
        bar.close()
    summary.steady_seconds = time.monotonic() - steady
    summary.rescheduled = count_reschedules(store.path, store.lease)
    with contextlib.suppress(Exception):
        summary.workers_lost = len(workers_before - set(client.scheduler_info().get("workers", {})))
    return summary


def shard_files_equal(a: str | os.PathLike, b: str | os.PathLike) -> list[str]:
    """Names of the array data files (shards) that differ between two stores, byte for byte
    (attributes such as creation times are not compared). Empty list = identical arrays."""
    a, b = Path(a), Path(b)
    files = {p.relative_to(a) for p in a.rglob("*") if p.is_file() and "/c/" in f"/{p.relative_to(a).as_posix()}"}
    files |= {p.relative_to(b) for p in b.rglob("*") if p.is_file() and "/c/" in f"/{p.relative_to(b).as_posix()}"}
    return sorted(str(f) for f in files
                  if not ((a / f).is_file() and (b / f).is_file() and (a / f).read_bytes() == (b / f).read_bytes()))

