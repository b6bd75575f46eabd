"""An exclusive, crash-safe lock on a feature store: one ``avel-extract`` per store at a time.

The lock is ``fcntl.flock`` on the file ``logs/extract.lock`` inside the store directory (``logs``
is an empty Zarr group, so Zarr readers never trip over the plain files kept there, such as the
runner's ``failures.jsonl``). The operating
system releases it when the holder exits, however it exits (crash, ``kill -9``), so a stale lock
file never blocks a later run. The file also records who holds the lock (pid, host, start time,
command) so that a refused run can say so. POSIX only (Linux, macOS).
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

    def __init__(self, store_dir: str | os.PathLike):
        self.store_dir = Path(store_dir)
        self.path = self.store_dir / LOG_GROUP / LOCK_NAME
        self._fh = None

    def holder(self) -> dict:
        """What the lock file says about its (last) holder; {} if unreadable."""
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self) -> "StoreLock":
        import fcntl

        log_dir(self.store_dir)
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            who = self.holder()
            desc = ", ".join(f"{k} {who[k]}" for k in ("pid", "host", "started") if k in who) or "unknown process"
            raise StoreLocked(
                f"{self.store_dir}: another avel-extract is writing this store ({desc}); "
                f"wait for it to finish or stop it, then run again (lock file {self.path})"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
        }))
        fh.flush()
        self._fh = fh
        log.debug("locked %s", self.path)
        return self

    def release(self) -> None:
        if self._fh is not None:
            import fcntl

            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None

    def __enter__(self) -> "StoreLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
