"""``avel-extract`` over Dask: one task per store shard, on a LocalCluster or an existing cluster.

Where the work runs (``--scheduler`` / ``dask.scheduler`` in pipeline.yaml):

- not set: the single-machine path of :mod:`extract.run` (decode worker pool + one process that
  holds the networks). It stays the default because on one machine a LocalCluster adds nothing:
  every worker process would load its own copy of the networks and decode serially, while the
  single-machine path already decodes on all cores and batches the networks across a shard;
- ``local``: an embedded :class:`distributed.LocalCluster` whose scheduler, workers, nannies and
  dashboard all listen on 127.0.0.1 only (random ports), ``dask.n_workers`` processes (default:
  one per GPU with ``extract.device`` cuda, else one per ``dask.threads_per_worker`` cores);
- ``tcp://host:8786``: an existing scheduler (e.g. started by dask-jobqueue on SLURM, see README);
- ``tls://host:8786``: the same with Dask's TLS security, certificates from ``dask.tls_ca_file``,
  ``dask.tls_client_cert``, ``dask.tls_client_key`` or from Dask's own configuration/environment
  (``DASK_DISTRIBUTED__COMM__TLS__CA_FILE``, ``..._CLIENT__CERT``, ``..._CLIENT__KEY``).

**Writes are safe by construction.** The driver (this process) creates the store, grows it,
writes its attributes and holds its lock (:mod:`extract.lock`); it then plans the work as
:class:`ShardJob` objects, one per store shard that has missing requested rows
(:func:`plan_jobs` checks that no shard is given to two jobs). A task owns shard k of EVERY array:
it reads the shard, sets its requested rows and writes the shard whole, status last
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
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from .decode import DecodeError, Failure, VideoRequest, decode_video
from .settings import ConfigError, fingerprint, to_dict

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

#: ``--scheduler local``: an embedded LocalCluster on the loopback interface
LOCAL = "local"
#: the loopback address an embedded cluster listens on
LOOPBACK = "127.0.0.1"


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


def plan_jobs(store, requests: Sequence[VideoRequest], cfg, device: str, decode_fn: Callable = decode_video,
              threads: int = 1) -> tuple[list[ShardJob], int]:
    """One :class:`ShardJob` per shard with missing requested rows, and the count of skipped rows.

    Raises ``RuntimeError`` if the plan would give one shard (or one row) to two jobs or put a row
    into a shard it does not belong to (the one-writer-per-shard rule).
    """
    from .run import plan_shards

    todo, skipped = plan_shards(store, requests)
    jobs = [ShardJob(str(store.path), shard, tuple(members), cfg, device, decode_fn, threads) for shard, members in todo]
    check_one_writer_per_shard(jobs, store.rows_per_shard)
    return jobs, skipped


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


def _settings_key(cfg, device: str) -> str:
    return fingerprint({"extract": to_dict(cfg), "device": device})


def worker_extractors(cfg, device: str, threads: int = 1) -> list:
    """The extractors of ``cfg`` on ``device``, built on first use in this process and then reused.

    On CPU torch is limited to ``threads`` threads (one worker = one core's share by default).
    """
    global _MODEL_LOADS
    device = worker_device(device)
    key = _settings_key(cfg, device)
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
    from .store import STATUS_DONE, STATUS_FAILED, STATUS_MISSING, open_store

    started = time.monotonic()
    store = open_store(job.store, mode="r+")
    rows = [row for row, _ in job.members]
    status = store.status()
    if all(status[row] != STATUS_MISSING for row in rows):
        return ShardResult(job.shard, int(sum(status[r] == STATUS_DONE for r in rows)),
                           int(sum(status[r] == STATUS_FAILED for r in rows)), True, _worker_name(), _MODEL_LOADS,
                           time.monotonic() - started)
    extractors = worker_extractors(job.cfg, job.device, job.threads)
    grids, audio = decode_inputs(extractors)
    timeout = float(job.cfg.decode_timeout_s) if job.cfg.decode_timeout_s else None
    decoded = [_decode_one(job.decode_fn, request, grids, job.cfg.segments, audio, timeout) for _, request in job.members]
    done, failed = finish_shard(store, job.shard, list(job.members), decoded, extractors, job.cfg.segments)
    return ShardResult(job.shard, done, failed, False, _worker_name(), _MODEL_LOADS, time.monotonic() - started)


# ------------------------------------------------------------------------------------------
# connecting


def security_from_config(dask_cfg, scheduler: str, resolve_path: Callable[[str], Path] = Path):
    """A :class:`distributed.security.Security` for ``tls://`` addresses, or None.

    Certificates come from ``dask.tls_*`` (paths resolved with ``resolve_path``) when any is set,
    else from Dask's configuration/environment. A ``tls://`` scheduler without any CA file is a
    :class:`ConfigError` naming the keys to set.
    """
    from distributed.security import Security

    files = {"tls_ca_file": dask_cfg.tls_ca_file, "tls_client_cert": dask_cfg.tls_client_cert,
             "tls_client_key": dask_cfg.tls_client_key}
    given = {k: str(resolve_path(v)) for k, v in files.items() if v}
    if not scheduler.startswith("tls://"):
        if given:
            log.warning("dask.tls_* are set but the scheduler %s is not a tls:// address; they are not used", scheduler)
        return None
    for key, path in given.items():
        if not os.path.isfile(path):
            raise ConfigError(f"dask.{key}: {path} does not exist")
    if given:
        return Security(require_encryption=True, **given)
    security = Security()  # reads distributed.comm.tls.* (environment DASK_DISTRIBUTED__COMM__TLS__*)
    if not security.tls_ca_file:
        raise ConfigError(
            f"--scheduler {scheduler}: a tls:// scheduler needs certificates: set dask.tls_ca_file, "
            "dask.tls_client_cert and dask.tls_client_key in pipeline.yaml, or the environment variables "
            "DASK_DISTRIBUTED__COMM__TLS__CA_FILE, DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT, "
            "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY")
    return security


@contextlib.contextmanager
def dask_client(dask_cfg, scheduler: str | None = None, *, gpu: bool = False,
                resolve_path: Callable[[str], Path] = Path) -> Iterator[Any]:
    """A :class:`distributed.Client` for ``scheduler`` (default ``dask.scheduler``; ``local`` or
    None = an embedded LocalCluster on 127.0.0.1, closed on exit)."""
    from distributed import Client, LocalCluster

    address = scheduler or dask_cfg.scheduler or LOCAL
    if address == LOCAL:
        workers = dask_cfg.n_workers or (_gpu_count() if gpu else 0) or max(
            1, (os.cpu_count() or 1) // max(1, dask_cfg.threads_per_worker))
        cluster = LocalCluster(n_workers=workers, threads_per_worker=dask_cfg.threads_per_worker, processes=True,
                               host=LOOPBACK, dashboard_address=f"{LOOPBACK}:0", resources={"GPU": 1} if gpu else None)
        try:
            with Client(cluster) as client:
                yield client
        finally:
            cluster.close()
        return
    if "://" not in address:
        raise ConfigError(f"--scheduler {address!r}: expected 'local', tcp://HOST:PORT or tls://HOST:PORT")
    security = security_from_config(dask_cfg, address, resolve_path)
    try:
        client = Client(address, security=security, timeout="30s")
    except (OSError, TimeoutError) as exc:
        raise ConfigError(f"cannot reach the Dask scheduler {address}: {exc}") from None
    with client:
        yield client


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


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
):
    """Extract ``requests`` into the store with one Dask task per shard; returns a
    :class:`extract.run.RunSummary` (with ``lost`` = rows whose task failed for good).

    ``client`` = an existing :class:`distributed.Client` (else one from :func:`dask_client`);
    ``on_result(result, client)`` is called in the driver after each finished task (tests use it
    to kill a worker in the middle of a run). The driver loads no network: the store identity
    comes from the configuration (weights files are hashed, nothing is built).
    """
    from .cache import store_specs
    from .extractors import extractor_identity
    from .run import distinct_requests, open_run_store, store_attrs

    started = time.monotonic()
    cfg, store_cfg = pipeline.extract, pipeline.store
    path = Path(store_path) if store_path is not None else pipeline.path(store_cfg.path)
    requests = distinct_requests(requests)  # first wins, as in extract.run
    attrs = store_attrs(cfg, extractor_identity(cfg))
    specs = store_specs(cfg)
    with open_run_store(path, [r.key for r in requests], cfg.segments, specs, attrs, store_cfg) as store:
        jobs, skipped = plan_jobs(store, requests, cfg, cfg.device, decode_fn, pipeline.dask.threads_per_worker)
        with contextlib.ExitStack() as stack:
            if client is None and jobs:
                client = stack.enter_context(dask_client(pipeline.dask, scheduler, gpu=_wants_gpu(cfg.device),
                                                         resolve_path=pipeline.path))
            summary = _run_jobs(client, store, jobs, skipped, requests, pipeline.dask, progress, on_result)
    summary.seconds = time.monotonic() - started
    return summary


def _run_jobs(client, store, jobs: list[ShardJob], skipped: int, requests, dask_cfg, progress: bool, on_result):
    from tqdm import tqdm

    from .run import RunSummary
    from .store import STATUS_FAILED, STATUS_MISSING

    summary = RunSummary(store=store.path, requested=len(requests), skipped=skipped)
    summary.lost = 0  # type: ignore[attr-defined]
    summary.workers = {}  # type: ignore[attr-defined]  worker -> model loads
    total = sum(len(job.members) for job in jobs)
    log.info("%s: %d videos to extract in %d shard tasks, %d already done", store.path, total, len(jobs), skipped)
    if jobs:
        from distributed import as_completed

        token = uuid.uuid4().hex[:8]
        resources = {"GPU": 1} if _wants_gpu(jobs[0].device) else None
        futures = {}
        for job in jobs:
            future = client.submit(extract_shard, job, key=f"avel-shard-{job.shard}-{token}", pure=False,
                                   retries=dask_cfg.retries, resources=resources)
            futures[future.key] = (future, job)
        steady = time.monotonic()
        bar = tqdm(total=total, unit="video", disable=not progress, dynamic_ncols=True, mininterval=1.0, desc="extract")
        try:
            for future in as_completed([f for f, _ in futures.values()]):
                job = futures[future.key][1]
                try:
                    result: ShardResult = future.result()
                except Exception as exc:  # noqa: BLE001 - a task lost for good (retries / allowed-failures spent)
                    summary.lost += len(job.members)  # type: ignore[attr-defined]
                    log.error("shard %d (%d videos) could not be extracted: %s: %s; its rows stay missing, run "
                              "again to retry them", job.shard, len(job.members), type(exc).__name__, exc)
                    bar.update(len(job.members))
                    continue
                summary.done += result.done
                summary.failed += result.failed
                summary.workers[result.worker] = max(result.model_loads, summary.workers.get(result.worker, 0))  # type: ignore[attr-defined]
                bar.update(len(job.members))
                bar.set_postfix(failed=summary.failed, refresh=False)
                if on_result is not None:
                    on_result(result, client)
        finally:
            bar.close()
        summary.steady_seconds = time.monotonic() - steady
    status = store.status()
    rows = [store.row_of(r.key) for r in requests]
    summary.failed_total = int(sum(status[r] in (STATUS_FAILED, STATUS_MISSING) for r in rows))
    return summary


def summary_text(summary) -> str:
    """:meth:`RunSummary.text` plus the rows lost to failed tasks."""
    text = summary.text()
    lost = getattr(summary, "lost", 0)
    if lost:
        text += (f"\n  {lost} videos were not extracted: their tasks failed for good (see the log); "
                 "run the same command again to compute them")
    return text


def shard_files_equal(a: str | os.PathLike, b: str | os.PathLike) -> list[str]:
    """Names of the array data files (shards) that differ between two stores, byte for byte
    (attributes such as creation times are not compared). Empty list = identical arrays."""
    a, b = Path(a), Path(b)
    files = {p.relative_to(a) for p in a.rglob("*") if p.is_file() and "/c/" in f"/{p.relative_to(a).as_posix()}"}
    files |= {p.relative_to(b) for p in b.rglob("*") if p.is_file() and "/c/" in f"/{p.relative_to(b).as_posix()}"}
    return sorted(str(f) for f in files
                  if not ((a / f).is_file() and (b / f).is_file() and (a / f).read_bytes() == (b / f).read_bytes()))


# ------------------------------------------------------------------------------------------
# command line


def run_cli(pipeline, *, split: str | None = None, manifest: str | None = None, video_root: str | None = None,
            progress: bool = True, scheduler: str | None = None, cache: bool = False) -> int:
    """``avel-extract`` main body with ``--scheduler`` / ``--cache``: run, print the summary,
    return the exit code (0 ok, 1 some video failed or was not extracted, 2 the run could not
    start). Without a scheduler (option or ``dask.scheduler``) and without the cache this is
    :func:`extract.run.run_extraction_cli`, the single-machine path."""
    import functools
    import sys

    from .lock import StoreLocked
    from .manifest import ManifestError
    from .run import collect_requests, run_extraction_cli
    from .store import StoreError

    scheduler = scheduler or pipeline.dask.scheduler
    if not scheduler and not cache:
        return run_extraction_cli(pipeline, split=split, manifest=manifest, video_root=video_root, progress=progress)
    try:
        requests = collect_requests(pipeline, split, manifest, video_root)
        if cache:
            from .cache import extract_with_cache

            runner = functools.partial(run_extraction_dask, scheduler=scheduler) if scheduler else None
            result = extract_with_cache(pipeline, requests, progress=progress, runner=runner)
            text = result.text()
        else:
            result = run_extraction_dask(pipeline, requests, scheduler=scheduler, progress=progress)
            text = summary_text(result)
    except (ConfigError, ManifestError, StoreError, StoreLocked, FileNotFoundError, ValueError) as exc:
        print(f"avel-extract: error: {exc}", file=sys.stderr)
        return 2
    print(text, file=sys.stderr)
    return result.exit_code
