"""An exclusive, crash-safe lock on a feature store: one ``avel-extract`` per store at a time.

The lock is ``fcntl.flock`` on the file ``logs/extract.lock`` inside the store directory (``logs``
is an empty Zarr group, so Zarr readers never trip over the plain files kept there, such as the
runner's ``failures.jsonl``). The operating
system releases it when the holder exits, however it exits (crash, ``kill -9``), so a stale lock
file never blocks a later run. The file also records who holds the lock (pid, host, start time,
command) so that a refused run can say so. POSIX only (Linux, macOS).

``StoreLock(path, wait=True)`` queues behind the holder instead of refusing (``avel-extract
--wait``), saying so once. The lock is re-entrant within one process (flock would otherwise block
on a second descriptor of the same file), so a driver can hold a store's lock across several
steps that each take it, with no window in which another process slips in.

**Fencing shard writers.** Dask tasks write shards in other processes, and the tasks of a client
that was killed go on running. Every run that takes a store's lock writes a new **lease**
(:func:`new_lease`, ``logs/lease.json``, a random token); each task carries its run's token and
writes its shard only while holding that shard's lock (:func:`shard_lock`) and only if the lease
still holds its token (:func:`lease_token`). An orphaned task of an earlier run therefore never
writes once a new run has started, and two writers never interleave on one shard.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import socket
import sys
from pathlib import Path

log = logging.getLogger(__name__)

LOG_GROUP = "logs"
LOCK_NAME = "extract.lock"
LEASE_NAME = "lease.json"
SHARD_LOCKS = "shard-locks"

#: locks this process holds: lock file (real path) -> [open file, depth]
_HELD: dict[str, list] = {}


def log_dir(store_dir: str | os.PathLike) -> Path:
    """``<store>/logs``, created as an (empty) Zarr group if absent; lock and failure logs live there."""
    import zarr

    path = Path(store_dir) / LOG_GROUP
    if not (path / "zarr.json").is_file():
        zarr.open_group(str(path), mode="a")
    return path


class StoreLocked(RuntimeError):
    """Another process holds the store's lock; the message names it."""


class StoreLock:
    """``with StoreLock(store_dir): ...`` holds the store's exclusive lock (raises :class:`StoreLocked`)."""

    def __init__(self, store_dir: str | os.PathLike, wait: bool = False):
        self.store_dir = Path(store_dir)
        self.path = self.store_dir / LOG_GROUP / LOCK_NAME
        self.wait = wait
        self._key: str | None = None

    def holder(self) -> dict:
        """What the lock file says about its (last) holder; {} if unreadable."""
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def _describe_holder(self) -> str:
        who = self.holder()
        return ", ".join(f"{k} {who[k]}" for k in ("pid", "host", "started") if k in who) or "unknown process"

    def acquire(self) -> "StoreLock":
        import fcntl

        log_dir(self.store_dir)
        key = os.path.realpath(self.path)
        if key in _HELD:  # this process holds it already: re-enter
            _HELD[key][1] += 1
            self._key = key
            return self
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not self.wait:
                fh.close()
                raise StoreLocked(
                    f"{self.store_dir}: another avel-extract is writing this store ({self._describe_holder()}); "
                    f"wait for it to finish or stop it, then run again, or pass --wait to queue behind it "
                    f"(lock file {self.path})"
                ) from None
            log.warning("%s: waiting for the store's lock, held by %s (--wait)", self.store_dir, self._describe_holder())
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            log.warning("%s: got the store's lock", self.store_dir)
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
        }))
        fh.flush()
        _HELD[key] = [fh, 1]
        self._key = key
        log.debug("locked %s", self.path)
        return self

    def release(self) -> None:
        if self._key is None:
            return
        held = _HELD.get(self._key)
        self._key, key = None, self._key
        if held is None:
            return
        held[1] -= 1
        if held[1] == 0:
            import fcntl

            del _HELD[key]
            fcntl.flock(held[0].fileno(), fcntl.LOCK_UN)
            held[0].close()

    def __enter__(self) -> "StoreLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ------------------------------------------------------------------------------------------
# fencing of shard writers


def new_lease(store_dir: str | os.PathLike) -> str:
    """Write a new lease token for ``store_dir`` (the driver, holding the store's lock) and return it;
    tasks of earlier runs no longer match it and will not write."""
    import uuid

    token = uuid.uuid4().hex
    path = log_dir(store_dir) / LEASE_NAME
    tmp = path.with_name(f".{LEASE_NAME}.{token[:8]}")
    tmp.write_text(json.dumps({"token": token, "pid": os.getpid(), "host": socket.gethostname(),
                               "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}))
    os.replace(tmp, path)
    return token


def lease_token(store_dir: str | os.PathLike) -> str | None:
    """The token of the run that currently owns the store (None if no lease was ever written)."""
    try:
        return json.loads((Path(store_dir) / LOG_GROUP / LEASE_NAME).read_text()).get("token")
    except (OSError, ValueError):
        return None


class shard_lock:
    """``with shard_lock(store_dir, shard):`` an exclusive (blocking) lock on one shard's writes."""

    def __init__(self, store_dir: str | os.PathLike, shard: int):
        self.path = Path(store_dir) / LOG_GROUP / SHARD_LOCKS / f"{int(shard)}.lock"
        self._fh = None

    def __enter__(self) -> "shard_lock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a+")
        fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        import fcntl

        fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
        self._fh.close()
        self._fh = None
