"""Locks of a feature store: one driver per store at a time, one writer per shard, claims on rows.

The store's lock is ``fcntl.flock`` on the file ``logs/extract.lock`` inside the store directory
(``logs`` is an empty Zarr group, so Zarr readers never trip over the plain files kept there, such
as the runner's ``failures.jsonl``). The operating system releases it when the holder exits, however
it exits (crash, ``kill -9``), so a stale lock file never blocks a later run. The file also records
who holds the lock (pid, host, start time, command) so that a refused or waiting run can say so.
POSIX only (Linux, macOS).

``StoreLock(path, wait=True)`` queues behind the holder instead of refusing (``avel-extract
--wait``), saying whom it waits for. The lock is re-entrant within one thread (flock would
otherwise block on a second descriptor of the same file), so a driver can hold a store's lock
across several steps that each take it, with no window in which another process slips in; another
thread of the same process is another holder.

**Fencing shard writers.** Every write of a shard - the single-machine runner, a Dask task, the
copy of cache rows into a project store - reads the shard, sets its rows and writes it back whole,
all while holding that shard's lock (:class:`shard_lock`), and only if its **fence** still holds
(:func:`fence_holds`). A project store's fence is its **lease**: every run that takes the store's
lock writes a new one (:func:`new_lease`, ``logs/lease.json``, a random token) and its writers carry
that token, so the tasks of a killed client, which go on running, never write once a new run has
started, and two writers never interleave on one shard. The shared cache has several writers at
once (one per project computing into it); its fence is the writer's **claim** on the rows it
computes (:class:`RowClaim`).

**Claims on rows** (the shared cache). A run that computes rows of a shared store first claims them
under the store's lock (briefly held): ``logs/claims/<token>.json`` records the claimant (host,
PID, command, start time) and the row keys; ``logs/claims/<token>.lock`` is flock-ed by the claimant
for as long as the claim lives, so the claim of a process that died is found dead (the OS released
the lock) and removed by the next process that looks (:func:`live_claims`). A claim's writers write
only while it lives (:func:`claim_alive`). Another run wanting claimed rows waits for the claim
(:func:`wait_for_claim`, saying whom it waits for) or is refused, naming the claimant.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LOG_GROUP = "logs"
LOCK_NAME = "extract.lock"
LEASE_NAME = "lease.json"
SHARD_LOCKS = "shard-locks"
CLAIMS = "claims"
#: a fence that names a claim (:class:`RowClaim`) instead of a store lease
CLAIM_FENCE = "claim:"

#: store locks held in this process: (lock file real path, thread id) -> [open file, depth]
_HELD: dict[tuple[str, int], list] = {}
#: tokens of the claims this process holds (alive without asking the lock: on NFS, flock is
#: emulated with POSIX record locks, which never conflict within one process)
_OWN_CLAIMS: set[str] = set()


def log_dir(store_dir: str | os.PathLike) -> Path:
    """``<store>/logs``, created as an (empty) Zarr group if absent; lock and failure logs live there."""
    import zarr

    path = Path(store_dir) / LOG_GROUP
    if not (path / "zarr.json").is_file():
        zarr.open_group(str(path), mode="a")
    return path


def whoami() -> dict[str, Any]:
    """What a lock or claim file records about its holder: pid, host, start time, command."""
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)}


def describe(who: dict) -> str:
    """``pid 123 on host node7, command 'avel-extract --cache ...', started 2024-...``."""
    parts = []
    if "pid" in who:
        parts.append(f"pid {who['pid']}" + (f" on host {who['host']}" if who.get("host") else ""))
    if who.get("command"):
        parts.append(f"command {who['command']!r}")
    if who.get("started"):
        parts.append(f"started {who['started']}")
    return ", ".join(parts) or "unknown process"


class StoreLocked(RuntimeError):
    """Another process holds the store's lock (or claims rows this run needs); the message names it."""


def _flock(fh, exclusive: bool = True, block: bool = False) -> bool:
    """flock ``fh``; False if ``block`` is False and another open file holds it."""
    import fcntl

    flags = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if block else fcntl.LOCK_NB)
    try:
        fcntl.flock(fh.fileno(), flags)
    except BlockingIOError:
        return False
    return True


def _unlock(fh) -> None:
    import fcntl

    fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


class StoreLock:
    """``with StoreLock(store_dir): ...`` holds the store's exclusive lock (raises :class:`StoreLocked`).

    ``wait``: queue behind another holder (saying whom it waits for) instead of refusing;
    ``patience_s``: without ``wait``, try again for up to that many seconds before refusing (the
    shared cache's lock is only held for moments: growing it, claiming rows, verifying it).
    """

    def __init__(self, store_dir: str | os.PathLike, wait: bool = False, patience_s: float = 0.0):
        self.store_dir = Path(store_dir)
        self.path = self.store_dir / LOG_GROUP / LOCK_NAME
        self.wait = wait
        self.patience_s = float(patience_s)
        self._key: tuple[str, int] | None = None

    def holder(self) -> dict:
        """What the lock file says about its (last) holder; {} if unreadable."""
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def _describe_holder(self) -> str:
        return describe(self.holder())

    def acquire(self) -> "StoreLock":
        log_dir(self.store_dir)
        key = (os.path.realpath(self.path), threading.get_ident())
        if key in _HELD:  # this thread holds it already: re-enter
            _HELD[key][1] += 1
            self._key = key
            return self
        fh = open(self.path, "a+")
        deadline = time.monotonic() + self.patience_s
        got = _flock(fh)
        while not got and not self.wait and time.monotonic() < deadline:
            time.sleep(0.2)
            got = _flock(fh)
        if not got:
            if not self.wait:
                fh.close()
                raise StoreLocked(
                    f"{self.store_dir}: another avel-extract is writing this store ({self._describe_holder()}); "
                    f"wait for it to finish or stop it, then run again, or pass --wait to queue behind it "
                    f"(lock file {self.path})"
                ) from None
            log.warning("%s: waiting for the store's lock, held by %s (--wait)", self.store_dir, self._describe_holder())
            _flock(fh, block=True)
            log.warning("%s: got the store's lock", self.store_dir)
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps(whoami()))
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
            del _HELD[key]
            _unlock(held[0])
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


def fence_holds(store_dir: str | os.PathLike, fence: str | None) -> bool:
    """Whether a writer carrying ``fence`` may still write ``store_dir``: a lease token that is the
    store's current lease, or ``claim:<token>`` of a claim that still lives (:func:`claim_alive`).
    No fence never holds: every writer is fenced."""
    if not fence:
        return False
    if fence.startswith(CLAIM_FENCE):
        return claim_alive(store_dir, fence[len(CLAIM_FENCE):])
    return lease_token(store_dir) == fence


class shard_lock:
    """``with shard_lock(store_dir, shard):`` an exclusive (blocking) lock on one shard's writes
    (and on reads that must not see a shard half rewritten)."""

    def __init__(self, store_dir: str | os.PathLike, shard: int):
        self.path = Path(store_dir) / LOG_GROUP / SHARD_LOCKS / f"{int(shard)}.lock"
        self.shard = int(shard)
        self._fh = None

    def __enter__(self) -> "shard_lock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a+")
        if not _flock(self._fh):
            log.debug("shard %d of %s: waiting for its lock", self.shard, self.path.parent.parent.parent)
            _flock(self._fh, block=True)
        return self

    def __exit__(self, *exc) -> None:
        _unlock(self._fh)
        self._fh.close()
        self._fh = None


# ------------------------------------------------------------------------------------------
# claims on rows of a shared store (the cache)


def _claims_dir(store_dir: str | os.PathLike) -> Path:
    return Path(store_dir) / LOG_GROUP / CLAIMS


class RowClaim:
    """A claim on rows (``keys``) of a shared store, held by this process until :meth:`release`
    (or its death). Take it only while holding the store's lock, after :func:`live_claims` said
    that no live claim holds these keys. ``fence`` is what its shard writers carry."""

    def __init__(self, store_dir: str | os.PathLike, keys):
        self.store_dir = Path(store_dir)
        self.keys = sorted(set(keys))
        self.token = uuid.uuid4().hex
        self._fh = None

    @property
    def fence(self) -> str:
        return CLAIM_FENCE + self.token

    def acquire(self) -> "RowClaim":
        folder = _claims_dir(self.store_dir)
        folder.mkdir(parents=True, exist_ok=True)
        self._fh = open(folder / f"{self.token}.lock", "a+")
        _flock(self._fh, block=True)  # a new file: nobody else holds it
        record = {"token": self.token, **whoami(), "keys": self.keys}
        tmp = folder / f".{self.token}.json.tmp"
        tmp.write_text(json.dumps(record))
        os.replace(tmp, folder / f"{self.token}.json")
        _OWN_CLAIMS.add(self.token)
        return self

    def release(self) -> None:
        """End the claim: its record first (its writers stop), then its lock."""
        if self._fh is None:
            return
        folder = _claims_dir(self.store_dir)
        _OWN_CLAIMS.discard(self.token)
        for name in (f"{self.token}.json", f"{self.token}.lock"):
            (folder / name).unlink(missing_ok=True)
        _unlock(self._fh)
        self._fh.close()
        self._fh = None

    def __enter__(self) -> "RowClaim":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def claim_alive(store_dir: str | os.PathLike, token: str) -> bool:
    """Whether the claim ``token`` still lives: its record is there and its lock is held."""
    folder = _claims_dir(store_dir)
    if not (folder / f"{token}.json").is_file():
        return False
    if token in _OWN_CLAIMS:
        return True
    try:
        fh = open(folder / f"{token}.lock", "r")
    except FileNotFoundError:
        return False
    with fh:
        if _flock(fh, exclusive=False):
            _unlock(fh)
            return False  # nobody holds it: its claimant died
    return True


def live_claims(store_dir: str | os.PathLike) -> list[dict]:
    """The live claims on the store's rows (their records: token, pid, host, command, started,
    keys); claims whose claimant died are removed. The caller holds the store's lock."""
    folder = _claims_dir(store_dir)
    if not folder.is_dir():
        return []
    claims = []
    for lock_path in sorted(folder.glob("*.lock")):
        token = lock_path.stem
        record_path = folder / f"{token}.json"
        if token in _OWN_CLAIMS:  # held by this process (another thread)
            try:
                claims.append(json.loads(record_path.read_text()))
            except (OSError, ValueError):
                pass
            continue
        try:
            fh = open(lock_path, "r")
        except FileNotFoundError:  # released meanwhile
            continue
        with fh:
            if _flock(fh):  # nobody holds it: the claimant died (or released it just now)
                try:
                    dead = json.loads(record_path.read_text())
                    log.warning("%s: removed the claim of a process that is gone (%s) on %d rows", store_dir,
                                describe(dead), len(dead.get("keys", [])))
                except (OSError, ValueError):
                    pass
                record_path.unlink(missing_ok=True)
                lock_path.unlink(missing_ok=True)
                _unlock(fh)
                continue
        try:
            claims.append(json.loads(record_path.read_text()))
        except (OSError, ValueError):  # released meanwhile, or a claimant in the middle of writing it
            continue
    return claims


def wait_for_claim(store_dir: str | os.PathLike, claim: dict) -> None:
    """Block until the claim (a record of :func:`live_claims`) ends, however its claimant ends."""
    try:
        fh = open(_claims_dir(store_dir) / f"{claim['token']}.lock", "r")
    except FileNotFoundError:
        return
    with fh:
        _flock(fh, exclusive=False, block=True)
        _unlock(fh)
