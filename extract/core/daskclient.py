"""Connecting to Dask, shared by both stages (``avel-extract --scheduler``, ``avel-train`` sweeps).

``local`` (or None) starts an embedded LocalCluster whose scheduler, workers and dashboard listen
on 127.0.0.1 only; ``tcp://HOST:PORT`` and ``tls://HOST:PORT`` connect to an existing scheduler
after a quick TCP probe (a refused address is reported at once) within ``dask.connect_timeout``
seconds; ``slurm`` submits worker jobs to SLURM (:mod:`extract.core.slurm`, section ``dask.slurm``).
:func:`check_workers` checks on every worker that the run's files are reachable there.
Imports ``distributed`` only when called.
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from .settings import ConfigError
from .slurm import SLURM  # noqa: F401  (``--scheduler slurm``; re-exported for the CLIs)

log = logging.getLogger(__name__)

#: ``--scheduler local``: an embedded LocalCluster on the loopback interface
LOCAL = "local"
#: the loopback address an embedded cluster listens on
LOOPBACK = "127.0.0.1"


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
                resolve_path: Callable[[str], Path] = Path, stage: str = "run") -> Iterator[Any]:
    """A :class:`distributed.Client` for ``scheduler`` (default ``dask.scheduler``; ``local`` or
    None = an embedded LocalCluster on 127.0.0.1, closed on exit; ``slurm`` = worker jobs named
    after ``stage``, cancelled on exit)."""
    address = scheduler or dask_cfg.scheduler or LOCAL
    if address == SLURM:
        from .slurm import SlurmWorkers

        with SlurmWorkers(dask_cfg.slurm, threads=dask_cfg.threads_per_worker, gpu=gpu, stage=stage,
                          log_directory=resolve_path(dask_cfg.slurm.log_directory),
                          connect_timeout=float(dask_cfg.connect_timeout)) as workers:
            yield workers.client
        return
    from distributed import Client, LocalCluster

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
    check_address(address)
    security = security_from_config(dask_cfg, address, resolve_path)
    timeout = float(dask_cfg.connect_timeout)
    probe(address, timeout)
    try:
        client = Client(address, security=security, timeout=f"{timeout}s")
    except (OSError, TimeoutError) as exc:
        raise ConfigError(f"cannot reach the Dask scheduler {address} within dask.connect_timeout={timeout:g} s: "
                          f"{exc}") from None
    with client:
        yield client


def check_address(address: str) -> tuple[str, str, int]:
    """``tcp://HOST:PORT`` / ``tls://HOST:PORT`` -> (protocol, host, port); ConfigError otherwise."""
    from urllib.parse import urlsplit

    usage = f"--scheduler {address!r}: expected 'local', 'slurm', tcp://HOST:PORT or tls://HOST:PORT"
    if "://" not in address:
        raise ConfigError(usage)
    parts = urlsplit(address)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme not in ("tcp", "tls") or not parts.hostname or port is None:
        raise ConfigError(usage)
    return parts.scheme, parts.hostname, port


def probe(address: str, timeout: float) -> None:
    """Open (and close) a TCP connection to the scheduler: a refused or unroutable address is a
    ConfigError at once, not after the client's retries."""
    import socket

    _, host, port = check_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        raise ConfigError(f"cannot reach the Dask scheduler {address}: {exc.strerror or exc} "
                          f"(is `dask scheduler` running there? dask.connect_timeout={timeout:g} s)") from None


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def _check_on_worker(paths: list[str], folders: list[str]) -> list[str]:
    """Runs on a worker: problems with reading ``paths`` and writing into ``folders`` there."""
    import tempfile

    problems = [f"cannot read {p}" for p in paths if not os.access(p, os.R_OK)]
    for folder in folders:
        probe_dir = folder
        while probe_dir and not os.path.isdir(probe_dir):  # the store's folder may not exist yet
            probe_dir = os.path.dirname(probe_dir)
        try:
            with tempfile.NamedTemporaryFile(dir=probe_dir or "/", prefix=".avel-write-check-"):
                pass
        except OSError as exc:
            problems.append(f"cannot write in {folder} ({exc.strerror or exc})")
    return problems


def check_workers(client, paths: Sequence[str], folders: Sequence[os.PathLike]) -> None:
    """Check on every worker that the videos are readable and the folders writable there; a
    ConfigError naming the worker and the paths otherwise (before any row is written)."""
    folders = [str(f) for f in folders]
    # a file this process cannot read either is an input error (failed per video), not the cluster's
    paths = [p for p in paths if os.access(p, os.R_OK)]
    try:
        answers = client.run(_check_on_worker, paths, folders)
    except Exception as exc:  # noqa: BLE001 - a worker that cannot run the check is a problem too
        raise ConfigError(f"could not check the Dask workers: {type(exc).__name__}: {exc}") from None
    if not answers:
        raise ConfigError("the Dask cluster has no workers: start `dask worker SCHEDULER_ADDRESS` first")
    bad = {worker: problems for worker, problems in answers.items() if problems}
    if bad:
        lines = []
        for worker, problems in sorted(bad.items()):
            shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
            lines.append(f"worker {worker}: {shown}")
        raise ConfigError(
            "the Dask workers cannot reach this run's files (a cluster needs the videos, the store and the cache on a "
            "file system every worker sees, at the same absolute paths): " + " | ".join(lines))
