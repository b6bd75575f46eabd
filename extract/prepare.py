"""Store preparation, by the driver only (the process that holds the store's lock): create the
store atomically, refuse one made with other settings, repair an interrupted growth, append rows,
take a new lease. Workers never do any of this; they only write whole shards.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Sequence

from .provenance import differing_fields, same_feature_set
from .core.store import ArraySpec, FeatureStore, StoreError, check_arrays, create_store, open_store

__all__ = ["ensure_store", "check_identity", "upgrade_store", "grow_store", "check_existing_store", "open_run_store",
           "open_claimed_store"]


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
        if same_feature_set(store.fingerprint, old, attrs["fingerprint"]):
            return  # recorded before logical weights identities: the same features (upgrade_store)
        diffs = differing_fields(old, attrs["fingerprint_fields"]) if old else ["(the store records no fingerprint fields)"]
        raise StoreError(
            f"{store.path}: refusing to write: the store was made with other extraction settings "
            f"(fingerprint {store.fingerprint} != {attrs['fingerprint']}); differing: " + "; ".join(diffs[:12])
            + ". Use another store.path, or the store's settings (see its 'extractor' attribute)."
        )


def upgrade_store(store: FeatureStore, attrs: dict[str, Any]) -> None:
    """Record the current identity attributes in a store that :func:`check_identity` accepted as
    the same feature set under an older record (the driver only, holding the store's lock): its
    ``fingerprint``, ``fingerprint_fields``, ``extractors`` and ``weights`` become this run's, the
    old fingerprint is kept in ``upgraded_from``. Nothing happens when they are equal already."""
    if store.fingerprint == attrs["fingerprint"]:
        return
    import logging

    logging.getLogger(__name__).warning("%s: recorded weights identities upgraded (fingerprint %s -> %s; the "
                                        "features are the same)", store.path, store.fingerprint, attrs["fingerprint"])
    store.set_attrs(upgraded_from=store.fingerprint, **{k: attrs[k] for k in ("fingerprint", "fingerprint_fields",
                                                                            "extractors", "weights") if k in attrs})


def grow_store(store: FeatureStore, new_keys: Sequence[str]) -> None:
    """Append rows for ``new_keys`` (status missing) to every array of the store (crash-safe:
    :meth:`FeatureStore.grow`)."""
    store.grow(list(new_keys))


def check_existing_store(path: Path, attrs: dict[str, Any], segments: int) -> None:
    """Refuse early (before any work) when a store exists at ``path`` with other settings."""
    if path.exists():
        check_identity(open_store(path), attrs, segments)


@contextlib.contextmanager
def open_run_store(path: Path, keys: Sequence[str], segments: int, specs: Sequence[ArraySpec],
                   attrs: dict[str, Any], store_cfg, create_attrs: dict[str, Any] | None = None,
                   wait: bool = False):
    """Create the store if absent (with ``create_attrs``, default ``attrs``), take its lock
    (``wait``: queue behind another holder), open it for writing, repair an interrupted growth,
    refuse one of other settings (:func:`check_identity`, :func:`extract.core.store.check_arrays`),
    append rows for the ``keys`` it lacks and take a new lease (fencing tasks of earlier runs);
    yields the open :class:`FeatureStore` while the lock is held (released on exit). A store that
    grows is marked incomplete first; the caller marks it complete at the end
    (``store.verified_before`` says whether it was complete when opened)."""
    from .core.lock import StoreLock, new_lease

    ensure_store(path, keys, segments, specs, attrs if create_attrs is None else create_attrs, store_cfg)
    with StoreLock(path, wait=wait):
        store = open_store(path, mode="r+")
        check_identity(store, attrs, segments)
        upgrade_store(store, attrs)
        store.repair_growth()
        check_arrays(store, specs)
        store.verified_before = store.attrs.get("complete") is True
        present = set(store.ids.tolist())
        new = [k for k in keys if k not in present]
        if new and store.attrs.get("complete") is not False:
            store.set_attrs(complete=False, verified=None)  # a kill during the run leaves it marked unfinished
        grow_store(store, new)
        store.lease = new_lease(path)
        yield store


@contextlib.contextmanager
def open_claimed_store(path: Path, keys: Sequence[str], segments: int, attrs: dict[str, Any], claim):
    """A store shared by several writers (the cache), opened for writing the rows of ``keys``
    under ``claim`` (an :class:`extract.core.lock.RowClaim` its caller took under the store's lock,
    after growing the store): nothing is locked, grown or re-leased here; the shard writers carry
    the claim as their fence and leave the store's attributes to the claim's owner."""
    store = open_store(path, mode="r+")
    check_identity(store, attrs, segments)
    unclaimed = sorted(set(keys) - set(claim.keys))
    if unclaimed:
        raise StoreError(f"{path}: rows {unclaimed[:3]} are not claimed by this run")
    for key in keys:
        store.row_of(key)  # KeyError naming the store if a row is absent
    store.lease = claim.fence
    store.shared = True
    yield store
