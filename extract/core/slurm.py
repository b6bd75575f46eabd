"""``--scheduler slurm``: Dask workers as SLURM batch jobs (dask-jobqueue), shared by both stages.

:class:`SlurmWorkers` (a context manager) is what ``avel-extract --scheduler slurm`` and
``avel-train ... --scheduler slurm`` run through:

1. **Checks before any job is queued** (:func:`check_request`, each failure a
   :class:`~extract.core.settings.ConfigError`, exit 2): ``sinfo`` answers; the partition exists and is
   up (``dask.slurm.partition``, else the default partition); the walltime fits the partition's
   limit; some node of the partition has the CPUs, memory and GPUs one job asks for; and
   ``sbatch --test-only`` accepts the job script (account, QOS, ``#SBATCH`` lines).
2. **Start**: a Dask scheduler in this process (on ``dask.slurm.interface``), ``dask.slurm.jobs``
   worker jobs submitted (``sbatch``), one Dask worker process per job; then it waits for the first
   worker (``dask.slurm.start_timeout``), so that the caller checks the shared file system and
   the environment on it before any store is touched.
3. **Jobs that end early are replaced**: a watcher thread looks at the queue (``squeue -t all``,
   every ``dask.slurm.poll_interval`` s). A job that ended (``scancel``, walltime ``TIMEOUT``,
   node failure, ...) is counted as lost and a new job is submitted in its place; Dask reschedules
   the tasks its worker held, and a shard task recomputes its shard from scratch, so the result is
   the same. Jobs that end before their worker ever connected (a wrong prologue, a Python that is
   not there) are counted too: ``dask.slurm.max_failed_starts`` of them in a row stop the run
   with the end of the job's log.
4. **No orphan jobs**: on exit (normal end, error, Ctrl-C, SIGTERM) every job of the run is
   cancelled (the cluster closes them, then ``scancel --name`` catches any job submitted in the
   meantime) and it waits until ``squeue`` no longer lists them. Workers also exit on their own
   ``dask.slurm.death_timeout`` s after losing the scheduler (a client killed with SIGKILL).

Every job of one run has the name ``<job_name>-<stage>-<run id>`` (``squeue -n`` shows them).
dask-jobqueue is an optional dependency (``pip install -e ".[slurm]"``); it and ``distributed``
are imported when used.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from .settings import ConfigError

log = logging.getLogger(__name__)

__all__ = ["SLURM", "SlurmWorkers", "SlurmStats", "check_request", "job_script", "require_jobqueue",
           "parse_walltime", "slurm_device"]

#: the ``--scheduler`` value that asks for SLURM worker jobs (:func:`extract.core.daskclient.dask_client`)
SLURM = "slurm"
#: how to install the optional dependency
EXTRA = 'pip install -e ".[slurm]"'
#: squeue states of a job that has ended (or is ending): its worker is gone
ENDED = {"BOOT_FAIL", "CANCELLED", "COMPLETED", "COMPLETING", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
         "PREEMPTED", "REVOKED", "SPECIAL_EXIT", "STOPPED", "TIMEOUT"}
#: the scheduler address in a printed job script (the real one is known once the scheduler runs)
PLACEHOLDER = "tcp://SCHEDULER-ADDRESS:PORT"


def require_jobqueue():
    """The dask_jobqueue module, or a ConfigError naming the extra to install.

    Importing dask-jobqueue 0.9 replaces the SIGINT handler of the process with ``sys.exit()``
    (dask_jobqueue/runner.py, at import): Ctrl-C would then end avel with exit code 0 and no word.
    The handler that was there before the import is put back."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main else None
    try:
        import dask_jobqueue
    except ImportError:
        raise ConfigError(f"--scheduler slurm needs dask-jobqueue, an optional dependency: {EXTRA}") from None
    finally:
        if main and previous is not None and signal.getsignal(signal.SIGINT) is not previous:
            signal.signal(signal.SIGINT, previous)
    return dask_jobqueue


# ------------------------------------------------------------------------------------------
# the job request


def parse_walltime(text: str | None) -> int | None:
    """SLURM's time formats -> minutes, seconds rounded up (``90`` = 90 min, ``30:00`` =
    30 min, ``01:00:00``, ``2-00:00:00``, ``1-12``...); None for ``infinite``/``UNLIMITED``."""
    value = str(text or "").strip()
    if value.lower() in ("", "infinite", "unlimited", "none"):
        return None
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", value)
    if not m:
        raise ConfigError(f"dask.slurm.walltime: {value!r} is not a SLURM time (MINUTES, HH:MM:SS or D-HH:MM:SS)")
    days, a, b, c = m.group(1), int(m.group(2)), m.group(3), m.group(4)
    if days is not None:  # D-H, D-H:M, D-H:M:S
        hours, minutes, seconds = a, int(b or 0), int(c or 0)
        return int(days) * 1440 + hours * 60 + minutes + math.ceil(seconds / 60)
    if c is not None:  # H:M:S
        return a * 60 + int(b) + math.ceil(int(c) / 60)
    if b is not None:  # M:S
        return a + math.ceil(int(b) / 60)
    return a  # M


def _format_minutes(minutes: int | None) -> str:
    if minutes is None:
        return "infinite"
    days, rest = divmod(minutes, 1440)
    return (f"{days}-" if days else "") + f"{rest // 60:02d}:{rest % 60:02d}:00"


def memory_mib(memory: str) -> int:
    """``8GB`` -> the MiB of the job's ``#SBATCH --mem`` as dask-jobqueue writes it: bytes rounded
    up to whole GiB (``8G`` = 8192 MiB) from 1 GiB on, else to whole MiB."""
    from dask.utils import parse_bytes

    try:
        n = parse_bytes(memory)
    except (ValueError, TypeError):
        raise ConfigError(f"dask.slurm.memory: {memory!r} is not an amount of memory (e.g. 16GB)") from None
    if n >= 1024 ** 3:
        return math.ceil(n / 1024 ** 3) * 1024
    return max(1, math.ceil(n / 1024 ** 2))


def gres(cfg) -> str | None:
    """``gpu:1`` / ``gpu:a100:1`` for ``dask.slurm.gpus`` 1, None for 0."""
    if not cfg.gpus:
        return None
    return f"gpu:{cfg.gpu_type}:{cfg.gpus}" if cfg.gpu_type else f"gpu:{cfg.gpus}"


def check_config(cfg) -> None:
    """The ``dask.slurm`` values that are wrong whatever the cluster says."""
    if cfg.jobs < 1:
        raise ConfigError(f"dask.slurm.jobs: at least 1, got {cfg.jobs}")
    if cfg.cores < 1:
        raise ConfigError(f"dask.slurm.cores: at least 1, got {cfg.cores}")
    if cfg.gpus not in (0, 1):
        raise ConfigError(f"dask.slurm.gpus: 0 or 1 (one Dask worker per GPU: ask for more jobs to use more GPUs), "
                          f"got {cfg.gpus}")
    if parse_walltime(cfg.walltime) is None:
        raise ConfigError(f"dask.slurm.walltime: a job needs a time limit, got {cfg.walltime!r}")
    memory_mib(cfg.memory)
    for key in ("poll_interval", "death_timeout"):
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"dask.slurm.{key}: must be > 0, got {getattr(cfg, key)}")


def slurm_device(device: str, cfg) -> str:
    """The device of a stage on SLURM workers: ``auto`` is ``cuda`` when the jobs ask for a GPU,
    else ``cpu`` (this login node's own GPUs say nothing about the compute nodes'). A cuda device
    without ``dask.slurm.gpus`` is a ConfigError."""
    device = str(device or "auto")
    if device == "auto":
        return "cuda" if cfg.gpus else "cpu"
    if device.startswith("cuda") and not cfg.gpus:
        raise ConfigError(f"device {device} on SLURM needs a GPU in every job: set dask.slurm.gpus: 1")
    if cfg.gpus and not device.startswith("cuda"):
        log.warning("dask.slurm.gpus is %d but the device is %s: the jobs' GPUs stay idle", cfg.gpus, device)
    return device


def _run(args: list[str], what: str, timeout: float = 60) -> subprocess.CompletedProcess:
    exe = shutil.which(args[0])
    if exe is None:
        raise ConfigError(f"--scheduler slurm: `{args[0]}` is not on PATH; run avel where you submit SLURM jobs "
                          "(a login node), with SLURM's commands on PATH")
    try:
        return subprocess.run([exe, *args[1:]], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ConfigError(f"--scheduler slurm: `{' '.join(args)}` ({what}) did not answer within {timeout:g} s") from None


@dataclasses.dataclass
class Partition:
    name: str
    default: bool
    up: bool
    state: str
    #: time limit in minutes, None = infinite
    limit: int | None


@dataclasses.dataclass
class Node:
    name: str
    cpus: int
    #: MiB
    memory: int
    #: GPU type -> count ("" = untyped)
    gpus: dict[str, int]

    def describe(self) -> str:
        gpu = ", ".join(f"{n} {t or 'GPU'}".rstrip() for t, n in self.gpus.items()) or "no GPU"
        return f"{self.name}: {self.cpus} CPUs, {self.memory} MB, {gpu}"


def partitions() -> dict[str, Partition]:
    """The cluster's partitions (``sinfo``); a ConfigError when sinfo fails (no controller...)."""
    proc = _run(["sinfo", "-h", "-o", "%P|%a|%l"], "list the partitions")
    if proc.returncode != 0:
        raise ConfigError(f"--scheduler slurm: `sinfo` failed ({proc.stderr.strip() or f'exit {proc.returncode}'}); "
                          "is this a machine that submits SLURM jobs?")
    out: dict[str, Partition] = {}
    for line in proc.stdout.splitlines():
        if line.count("|") != 2:
            continue
        name, avail, limit = line.split("|")
        default = name.endswith("*")
        name = name.rstrip("*")
        try:
            minutes = parse_walltime(limit)
        except ConfigError:
            minutes = None
        out[name] = Partition(name, default, avail.strip() == "up", avail.strip(), minutes)
    return out


def _parse_gres(text: str) -> dict[str, int]:
    gpus: dict[str, int] = {}
    for item in re.split(r",(?![^(]*\))", text or ""):
        item = re.sub(r"\(.*?\)", "", item).strip()
        parts = item.split(":")
        if not parts or parts[0] != "gpu":
            continue
        count = parts[-1] if len(parts) > 1 and parts[-1].isdigit() else "1"
        kind = parts[1] if len(parts) > 2 else ""
        gpus[kind] = gpus.get(kind, 0) + int(count)
    return gpus


def nodes(partition: str) -> list[Node]:
    """The nodes of ``partition`` with their CPUs, memory (MiB) and GPUs (``sinfo -N``)."""
    proc = _run(["sinfo", "-h", "-N", "-p", partition, "-o", "%N|%c|%m|%G"], "list the nodes")
    if proc.returncode != 0:
        raise ConfigError(f"--scheduler slurm: `sinfo -N -p {partition}` failed: {proc.stderr.strip()}")
    found: dict[str, Node] = {}
    for line in proc.stdout.splitlines():
        fields = line.split("|")
        if len(fields) != 4:
            continue
        name, cpus, memory, gres_text = fields
        try:
            found[name] = Node(name, int(cpus.rstrip("+")), int(memory.rstrip("+")), _parse_gres(gres_text))
        except ValueError:
            continue
    return list(found.values())


def check_request(cfg, script: str) -> str:
    """Everything SLURM can tell before a job is queued; returns the partition the jobs go to.

    ConfigError (exit 2) when: sinfo fails; the partition does not exist or is not up; the
    walltime is over the partition's limit; no node of the partition has the CPUs, memory and
    GPUs of one job; ``sbatch --test-only`` refuses ``script``.
    """
    check_config(cfg)
    parts = partitions()
    listing = ", ".join(p.name + ("*" if p.default else "") for p in parts.values()) or "none"
    if cfg.partition:
        if cfg.partition not in parts:
            raise ConfigError(f"dask.slurm.partition: {cfg.partition!r} is not a partition of this SLURM cluster "
                              f"(sinfo lists: {listing}; * = the default)")
        part = parts[cfg.partition]
    else:
        defaults = [p for p in parts.values() if p.default]
        if not defaults:
            raise ConfigError(f"this SLURM cluster has no default partition: set dask.slurm.partition (sinfo lists: "
                              f"{listing})")
        part = defaults[0]
    if not part.up:
        raise ConfigError(f"SLURM partition {part.name!r} is {part.state}, not up (sinfo): jobs would wait forever; "
                          f"choose another with dask.slurm.partition (sinfo lists: {listing})")
    minutes = parse_walltime(cfg.walltime)
    if part.limit is not None and minutes is not None and minutes > part.limit:
        raise ConfigError(f"dask.slurm.walltime {cfg.walltime} is longer than partition {part.name!r} allows "
                          f"({_format_minutes(part.limit)})")
    mib = memory_mib(cfg.memory)
    members = nodes(part.name)
    fits = [n for n in members if n.cpus >= cfg.cores and n.memory >= mib
            and (not cfg.gpus or (n.gpus.get(cfg.gpu_type, 0) if cfg.gpu_type else sum(n.gpus.values())) >= cfg.gpus)]
    if members and not fits:
        asked = f"{cfg.cores} CPU{'s' if cfg.cores > 1 else ''} (dask.slurm.cores), {mib} MB (dask.slurm.memory {cfg.memory})"
        if cfg.gpus:
            asked += f" and {cfg.gpus} {cfg.gpu_type or ''} GPU (dask.slurm.gpus)".replace("  ", " ")
        shown = "; ".join(n.describe() for n in sorted(members, key=lambda n: (-n.cpus, -n.memory))[:4])
        more = f"; and {len(members) - 4} more" if len(members) > 4 else ""
        raise ConfigError(f"no node of SLURM partition {part.name!r} can hold one worker job of {asked}: its nodes: "
                          f"{shown}{more}")
    _test_submit(script, part.name)
    return part.name


def _test_submit(script: str, partition: str) -> None:
    """``sbatch --test-only`` on the job script: SLURM's own verdict (accounts, QOS, limits)."""
    with tempfile.NamedTemporaryFile("w", suffix=".sh", prefix="avel-job-") as fh:
        fh.write(script)
        fh.flush()
        proc = _run(["sbatch", "--test-only", fh.name], "test the job script")
    if proc.returncode != 0:
        reason = " ".join((proc.stderr or proc.stdout).split()) or f"exit {proc.returncode}"
        raise ConfigError(f"SLURM refuses the worker job (sbatch --test-only, partition {partition!r}): {reason}; "
                          "see the job script with --print-job-script")


# ------------------------------------------------------------------------------------------
# the job script


def cluster_options(cfg, *, threads: int, gpu: bool, job_name: str, log_directory: str,
                    scheduler_host: bool = True) -> dict[str, Any]:
    """Keyword arguments of ``SLURMCluster``: one worker process per job with ``threads`` task
    threads, ``cfg.cores`` CPUs booked, a GPU (``--gres`` and the Dask resource ``GPU=1``) when
    ``gpu``."""
    directives = [f"--gres={gres(cfg)}"] if gres(cfg) else []
    directives += [d if d.startswith("-") else f"--{d}" for d in cfg.directives]
    worker_args = ["--resources", "GPU=1"] if gpu else []
    options: dict[str, Any] = dict(
        queue=cfg.partition, account=cfg.account, cores=threads, processes=1, job_cpu=cfg.cores,
        memory=cfg.memory, walltime=cfg.walltime, job_name=job_name, job_extra_directives=directives,
        job_script_prologue=list(cfg.prologue), worker_extra_args=worker_args, interface=cfg.interface,
        python=cfg.python or sys.executable, log_directory=log_directory, death_timeout=cfg.death_timeout,
        local_directory=cfg.local_directory, nanny=True,
    )
    if scheduler_host:
        options["scheduler_options"] = {"dashboard_address": ":0"}
    return options


def job_script(cfg, *, threads: int, gpu: bool, job_name: str, log_directory: str,
               scheduler: str = PLACEHOLDER) -> str:
    """The script one worker job runs (``sbatch``), for a scheduler at ``scheduler``."""
    jobqueue = require_jobqueue()
    check_config(cfg)
    # dask-jobqueue makes the log folder when it builds a job: build it on a temporary folder, so
    # that printing or testing a script creates nothing, and write the real folder into the text
    with tempfile.TemporaryDirectory(prefix="avel-slurm-") as scratch:
        options = cluster_options(cfg, threads=threads, gpu=gpu, job_name=job_name, log_directory=scratch,
                                  scheduler_host=False)
        job = jobqueue.SLURMCluster.job_cls(scheduler, name=f"{job_name}-worker", config_name="slurm", **options)
        return job.job_script().replace(scratch, str(log_directory))


# ------------------------------------------------------------------------------------------
# the running cluster


@dataclasses.dataclass
class SlurmStats:
    """The worker jobs of one run: submitted, ended early (with their SLURM state), replaced."""

    job_name: str = ""
    partition: str = ""
    #: job ids in the order they were submitted
    started: list[str] = dataclasses.field(default_factory=list)
    #: job id -> the state it ended in (TIMEOUT, CANCELLED, ...)
    lost: dict[str, str] = dataclasses.field(default_factory=dict)
    replaced: int = 0
    #: job ids that ended before their worker connected
    failed_starts: list[str] = dataclasses.field(default_factory=list)
    #: seconds of the checks before any job (sinfo, sbatch --test-only)
    checks_s: float | None = None
    #: seconds from the first sbatch to the first worker connected
    first_worker_s: float | None = None
    #: seconds from cancelling the jobs to squeue listing none of them
    cancel_s: float | None = None
    #: jobs still listed by squeue after the run ended and its jobs were cancelled
    left: list[str] = dataclasses.field(default_factory=list)
    cancelled: bool = False

    def text(self) -> str:
        states: dict[str, int] = {}
        for state in self.lost.values():
            states[state] = states.get(state, 0) + 1
        why = f" ({', '.join(f'{n} {s}' for s, n in sorted(states.items()))})" if states else ""
        line = (f"SLURM jobs ({self.job_name}, partition {self.partition}): started {len(self.started)}, "
                f"lost {len(self.lost)}{why}, replaced {self.replaced}")
        if self.first_worker_s is not None:
            line += f"; first worker after {self.first_worker_s:.1f} s"
        if self.cancelled:
            line += ("; all cancelled at the end, none left in the queue" if not self.left else
                     f"; still in the queue after cancelling: {', '.join(self.left)} (scancel them)")
        timings = [f"{label} {value:.1f} s" for label, value in (("checks", self.checks_s), ("cancelling", self.cancel_s))
                   if value is not None]
        return line + (f" ({', '.join(timings)})" if timings else "")


class SlurmWorkers:
    """Dask workers as SLURM jobs for the time of a ``with`` block (see the module docstring).

    ``cfg`` = ``dask.slurm``; ``threads`` = Dask task threads per worker (``dask.threads_per_worker``);
    ``gpu`` = every job gets a GPU and the Dask resource ``GPU=1``; ``stage`` names the jobs
    (``avel-extract-1a2b3c``); ``log_directory`` = the resolved ``dask.slurm.log_directory``.
    Inside the block: :attr:`client` (a ``distributed.Client``, at least one worker connected)
    and :attr:`stats`.
    """

    def __init__(self, cfg, *, threads: int = 1, gpu: bool = False, stage: str = "run",
                 log_directory: str | os.PathLike | None = None, connect_timeout: float = 10.0,
                 log_summary: bool = True):
        self.cfg = cfg
        self.log_summary = log_summary
        self.threads = max(1, int(threads))
        self.gpu = gpu
        self.job_name = f"{cfg.job_name}-{stage}-{uuid.uuid4().hex[:6]}"
        self.log_directory = os.path.abspath(log_directory or cfg.log_directory)
        self.connect_timeout = connect_timeout
        self.stats = SlurmStats(job_name=self.job_name)
        self.cluster = None
        self.client = None
        self.error: str | None = None
        self._names: dict[str, str] = {}  # job id -> Dask worker name
        self._connected: set[str] = set()  # worker names seen by the scheduler
        self._handled: set[str] = set()  # job ids already counted as ended
        self._failed_in_row = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()  # _register runs in the watcher and in the caller's thread
        self._watcher: threading.Thread | None = None
        self._running = False  # the first worker connected: the caller's work has begun
        self._sigterm = None
        self._config = None
        self._t0 = 0.0

    # -- the script and the checks

    def script(self, scheduler: str = PLACEHOLDER) -> str:
        return job_script(self.cfg, threads=self.threads, gpu=self.gpu, job_name=self.job_name,
                          log_directory=self.log_directory, scheduler=scheduler)

    def check(self) -> str:
        """:func:`check_request` for this run's job script; the partition."""
        require_jobqueue()
        started = time.monotonic()
        self.stats.partition = check_request(self.cfg, self.script())
        self.stats.checks_s = time.monotonic() - started
        return self.stats.partition

    # -- context manager

    def __enter__(self) -> "SlurmWorkers":
        partition = self.stats.partition or self.check()
        self._install_sigterm()
        try:
            self._start(partition)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()
        if exc_type is KeyboardInterrupt and self.error:
            raise ConfigError(self.error) from None

    def _start(self, partition: str) -> None:
        import dask
        from distributed import Client

        jobqueue = require_jobqueue()
        os.makedirs(self.log_directory, exist_ok=True)
        options = cluster_options(self.cfg, threads=self.threads, gpu=self.gpu, job_name=self.job_name,
                                  log_directory=self.log_directory)
        options["queue"] = partition
        # replacing lost jobs is this class's work (the watcher), not the cluster's own timer
        # (read when a worker leaves: set for the life of the cluster, restored by close)
        self._config = dask.config.set({"distributed.deploy.lost-worker-timeout": "3600s"})
        self.cluster = jobqueue.SLURMCluster(**options)
        log.info("SLURM: Dask scheduler at %s; submitting %d worker job(s) %s to partition %s (logs: %s)",
                 self.cluster.scheduler_address, self.cfg.jobs, self.job_name, partition, self.log_directory)
        self._t0 = time.monotonic()  # sbatch runs at once, in the cluster's event loop
        self.cluster.scale(jobs=self.cfg.jobs)
        self.client = Client(self.cluster, timeout=f"{self.connect_timeout}s")
        self._watcher = threading.Thread(target=self._watch, name="avel-slurm-watcher", daemon=True)
        self._watcher.start()
        self._wait_first_worker()
        self._running = True

    def _wait_first_worker(self) -> None:
        timeout = self.cfg.start_timeout
        last_note = time.monotonic()
        while not self._worker_names():
            self._register()
            if self.error:
                raise ConfigError(self.error)
            now = time.monotonic()
            if timeout is not None and now - self._t0 > timeout:
                raise ConfigError(f"no SLURM worker job started within dask.slurm.start_timeout={timeout:g} s "
                                  f"({self._queue_text() or 'no job in the queue'}); nothing was written")
            if now - last_note > 30:
                log.info("SLURM: waiting for the first worker job to start: %s", self._queue_text())
                last_note = now
            time.sleep(0.1)
        self.stats.first_worker_s = time.monotonic() - self._t0
        self._register()
        log.info("SLURM: first worker connected %.1f s after submitting (%s)", self.stats.first_worker_s,
                 self._queue_text())

    def close(self) -> None:
        """Stop the watcher, cancel every job of the run, wait until squeue no longer lists them."""
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=max(5.0, 2 * self.cfg.poll_interval))
        with contextlib.suppress(Exception):
            self._register()
            if "COMPLETING" in self.stats.lost.values():
                deadline = time.monotonic() + 10  # the final state of a job lost a moment ago
                while "COMPLETING" in self.stats.lost.values() and time.monotonic() < deadline:
                    self._settle(self._states() or {})
                    time.sleep(0.2)
        started = time.monotonic()
        try:  # the cluster cancels its jobs; a second Ctrl-C here still reaches the scancel below
            if self.client is not None:
                with contextlib.suppress(Exception):
                    self.client.close(timeout=10)
            if self.cluster is not None:
                with contextlib.suppress(Exception):
                    self.cluster.close(timeout=30)
        finally:
            if self.cluster is not None:
                self.stats.cancelled = True
                self._cancel_all()
                self.stats.cancel_s = time.monotonic() - started
            if self._config is not None:
                self._config.__exit__(None, None, None)
                self._config = None
            self._restore_sigterm()
        if self.cluster is not None and self.log_summary:
            log.info("%s", self.stats.text())
        self.cluster = self.client = None

    def _cancel_all(self, timeout: float = 60) -> None:
        """``scancel`` every job named like this run's, then wait until squeue lists none of them."""
        me = str(os.geteuid())
        with contextlib.suppress(ConfigError):
            _run(["scancel", "--name", self.job_name, "--user", me], "cancel the worker jobs")
        deadline = time.monotonic() + timeout
        left = self._queued()
        while left and time.monotonic() < deadline:
            time.sleep(0.5)
            left = self._queued()
        self.stats.left = sorted(left)
        if left:
            log.warning("SLURM: jobs %s are still in the queue %g s after cancelling them", ", ".join(left), timeout)

    def _queued(self) -> list[str]:
        """Ids of this run's jobs that squeue still lists (pending, running, completing...)."""
        with contextlib.suppress(ConfigError):
            proc = _run(["squeue", "-h", "-n", self.job_name, "-o", "%i"], "list the worker jobs", timeout=30)
            if proc.returncode == 0:
                return [line.strip() for line in proc.stdout.splitlines() if line.strip()]
        return []

    # -- SIGTERM: unwind like Ctrl-C, so that the jobs are cancelled

    def _install_sigterm(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum, frame):
            raise KeyboardInterrupt(f"signal {signum}")

        self._sigterm = signal.signal(signal.SIGTERM, handler)

    def _restore_sigterm(self) -> None:
        if self._sigterm is not None:
            with contextlib.suppress(ValueError):
                signal.signal(signal.SIGTERM, self._sigterm)
            self._sigterm = None

    # -- the watcher

    def _worker_names(self) -> set[str]:
        cluster = self.cluster
        if cluster is None:
            return set()
        try:
            workers = dict(cluster.scheduler_info.get("workers", {}))
        except Exception:  # noqa: BLE001 - a cluster that is closing
            return set()
        names = {str(w.get("name")) for w in workers.values()}
        self._connected |= names
        return names

    def _jobs(self) -> dict[str, str]:
        """The cluster's current jobs: job id -> worker name (a job whose sbatch failed: ``"?<name>"``)."""
        cluster = self.cluster
        out: dict[str, str] = {}
        if cluster is None:
            return out
        for name, job in dict(cluster.workers).items():
            job_id = getattr(job, "job_id", None)
            out[str(job_id) if job_id else f"?{name}"] = str(name)
        return out

    def _states(self) -> dict[str, tuple[str, str]] | None:
        """job id -> (state, reason) of this run's jobs, ended ones included (None: squeue failed)."""
        try:
            proc = _run(["squeue", "-h", "-t", "all", "-n", self.job_name, "-o", "%i|%T|%r"], "watch the worker jobs",
                        timeout=30)
        except ConfigError as exc:
            log.warning("SLURM: %s", exc)
            return None
        if proc.returncode != 0:
            log.warning("SLURM: squeue failed: %s", proc.stderr.strip())
            return None
        states = {}
        for line in proc.stdout.splitlines():
            parts = line.strip().split("|")
            if len(parts) == 3:
                states[parts[0]] = (parts[1], parts[2])
        return states

    def _watch(self) -> None:
        while not self._stop.wait(self.cfg.poll_interval):
            try:
                self._look()
            except Exception as exc:  # noqa: BLE001 - the watcher must not die
                log.warning("SLURM: watching the jobs failed: %s: %s", type(exc).__name__, exc)

    def _register(self) -> None:
        """Note the jobs submitted since the last look, and the workers that connected."""
        with self._lock:
            self._worker_names()
            for job_id, name in self._jobs().items():
                if job_id not in self._names:
                    self._names[job_id] = name
                    if not job_id.startswith("?"):
                        self.stats.started.append(job_id)
                        log.info("SLURM: submitted worker job %s (worker %s)", job_id, name)

    def _look(self) -> None:
        self._register()
        states = self._states()
        if states is None or self._stop.is_set():
            return
        self._settle(states)
        ended = []
        for job_id, name in list(self._names.items()):
            if job_id in self._handled:
                continue
            if job_id.startswith("?"):
                state, reason = "SUBMIT_FAILED", "sbatch failed (see the log above)"
            elif job_id in states:
                state, reason = states[job_id]
                if state not in ENDED:
                    continue
            else:  # gone from squeue: ended more than MinJobAge ago
                state, reason = "ENDED", "no longer listed by squeue"
            ended.append((job_id, name, state, reason))
        forget = []
        for job_id, name, state, reason in ended:
            self._handled.add(job_id)
            if self._lost(job_id, name, state, reason):
                forget.append((name, job_id))
        if forget and not self._stop.is_set():
            self._replace(forget)

    def _settle(self, states: dict[str, tuple[str, str]]) -> None:
        """A job seen ending (COMPLETING) gets the state it ended in (CANCELLED, TIMEOUT, ...)."""
        for job_id, state in list(self.stats.lost.items()):
            final = states.get(job_id, (state, ""))[0]
            if state == "COMPLETING" and final in ENDED and final != "COMPLETING":
                self.stats.lost[job_id] = final

    def _lost(self, job_id: str, name: str, state: str, reason: str) -> bool:
        """Count an ended job; True when a new job should replace it."""
        connected = name in self._connected
        if not job_id.startswith("?"):
            self.stats.lost[job_id] = state
        if connected:
            self._failed_in_row = 0
            log.warning("SLURM: worker job %s ended early (%s%s); its tasks run again elsewhere, a new job replaces it",
                        job_id, state, f", {reason}" if reason and reason != "None" else "")
        else:
            self._failed_in_row += 1
            self.stats.failed_starts.append(job_id)
            tail = self._log_tail(job_id)
            log.warning("SLURM: worker job %s ended (%s) before its worker connected%s", job_id, state,
                        f"; end of its log:\n{tail}" if tail else "")
            if self._failed_in_row >= self.cfg.max_failed_starts:
                self.error = (f"{self._failed_in_row} SLURM worker jobs in a row ended before their Dask worker "
                              f"connected (last: job {job_id}, {state}); nothing more is submitted. "
                              + (f"End of its log ({self._log_path(job_id, 'err')}): {tail}" if tail else
                                 f"See its log in {self.log_directory}")
                              + " (dask.slurm.prologue and dask.slurm.python must give a Python with avel on the nodes)")
                log.error("%s", self.error)
                if self._running:  # the caller is waiting for results that will not come: stop it
                    import _thread

                    _thread.interrupt_main()
                return False
        if self.error:
            return False
        self.stats.replaced += 1
        return True

    def _replace(self, ended: list[tuple[str, str]]) -> None:
        """In the cluster's event loop: drop the ended jobs' workers (name, job id) from the
        cluster's plan, then scale back to ``dask.slurm.jobs``: a new job for each."""
        cluster, jobs = self.cluster, self.cfg.jobs

        def replace():
            for name, job_id in ended:
                job = cluster.workers.get(name)
                if job is None or str(getattr(job, "job_id", None)) == job_id or job_id.startswith("?"):
                    cluster.workers.pop(name, None)
                    cluster.worker_spec.pop(name, None)
            cluster.scale(jobs=jobs)

        cluster.loop.add_callback(replace)

    def _log_path(self, job_id: str, kind: str) -> Path:
        return Path(self.log_directory) / f"{self.job_name}-{job_id}.{kind}"

    def _log_tail(self, job_id: str, lines: int = 8) -> str:
        text = []
        for kind in ("err", "out"):
            with contextlib.suppress(OSError):
                text += self._log_path(job_id, kind).read_text(errors="replace").strip().splitlines()
        return " | ".join(line.strip() for line in text[-lines:])

    def _queue_text(self) -> str:
        states = self._states() or {}
        return ", ".join(f"job {i} {s}" + (f" ({r})" if r and r != "None" else "") for i, (s, r) in states.items())


def stage_workers(pipeline, *, stage: str, device: str) -> SlurmWorkers:
    """The :class:`SlurmWorkers` of a stage: ``dask.slurm`` of ``pipeline``, a GPU per job when
    ``device`` is cuda, the log folder resolved against pipeline.yaml's folder. The caller prints
    :attr:`SlurmWorkers.stats` in its summary (no log line of its own)."""
    dask_cfg = pipeline.dask
    return SlurmWorkers(dask_cfg.slurm, threads=dask_cfg.threads_per_worker, gpu=str(device).startswith("cuda"),
                        stage=stage, log_directory=pipeline.path(dask_cfg.slurm.log_directory),
                        connect_timeout=float(dask_cfg.connect_timeout), log_summary=False)


def print_job_script(pipeline, *, stage: str, device: str, echo: Callable[[str], Any] = print) -> None:
    """``--print-job-script``: the script of one worker job, with the resolved settings."""
    workers = stage_workers(pipeline, stage=stage, device=device)
    echo(workers.script().rstrip("\n"))
