"""The feature store contract: the only thing the two stages share.

A store is a Zarr v3 group per feature set (see docs/store.md):

- root attributes: ``schema`` ("avel-features"), ``schema_version``, ``segments`` (T),
  ``extractor`` (the full extractor configuration), ``fingerprint`` (hash of what changes the
  numbers), ``weights`` (name + sha256 per network, or "random"), ``versions`` (packages that made
  it), ``layout`` (chunk/shard/codec choices, not part of the fingerprint);
- arrays with one row per video (per video window), in the order of ``ids``:
  ``ids`` [N] str, ``visual`` [N, T, 7, 7, 512] float16, ``audio`` [N, T, 128] float32,
  ``valid`` [N, T] bool, ``status`` [N] int8 (0 missing, 1 done, 2 failed), ``reason`` [N] str.
  Other extractors add arrays under their own names with the same row order.

Every array is chunked one row per chunk and sharded ``rows_per_shard`` rows per shard along the
first axis. A shard is rewritten whole on every write, so **one writer per shard**: a writer owns
shard k of every array (rows ``k*S ... k*S+S-1``) and nobody else writes there concurrently.
Only the creator of the store creates arrays, resizes them or writes attributes.

This module imports numpy and zarr only.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

log = logging.getLogger(__name__)

SCHEMA = "avel-features"
SCHEMA_VERSION = 1

STATUS_MISSING = 0
STATUS_DONE = 1
STATUS_FAILED = 2
STATUS_NAMES = {STATUS_MISSING: "missing", STATUS_DONE: "done", STATUS_FAILED: "failed"}

#: per-row bookkeeping arrays (strings / status), not features: ``source`` = identity of the file a
#: row was computed from (``size=<bytes>;mtime_ns=<ns>``, "" when unknown), ``ran`` = what computed
#: it (``device=<kind>;precision=<p>``, "" for rows that were not computed)
BOOKKEEPING = ("ids", "status", "reason", "source", "ran")
#: bookkeeping string arrays that stores written before they existed may lack (added on open for writing)
ROW_RECORDS = ("source", "ran")

#: the arrays every AVE-style store has (row shape after N, with T as "T"), and their dtypes
CORE_ARRAYS: dict[str, tuple[tuple[Any, ...], str]] = {
    "visual": (("T", 7, 7, 512), "float16"),
    "audio": (("T", 128), "float32"),
    "valid": (("T",), "bool"),
}


class StoreError(RuntimeError):
    """The store is missing, of another schema, or its arrays do not have the expected shape."""


@dataclasses.dataclass(frozen=True)
class ArraySpec:
    """A per-row array of the store: ``row_shape`` excludes the leading N axis."""

    name: str
    row_shape: tuple[int, ...]
    dtype: str


def core_specs(segments: int) -> list[ArraySpec]:
    """The contract's ``visual``, ``audio``, ``valid`` arrays for T = ``segments``."""
    return [
        ArraySpec(name, tuple(segments if d == "T" else d for d in shape), dtype)
        for name, (shape, dtype) in CORE_ARRAYS.items()
    ]


def _zarr():
    import zarr

    return zarr


def _compressors(level: int):
    from zarr.codecs import ZstdCodec

    return (ZstdCodec(level=level),)


class FeatureStore:
    """A feature store opened for reading or writing. Use :func:`create_store` / :func:`open_store`."""

    def __init__(self, group, path: Path):
        self.group = group
        self.path = path
        self._ids: np.ndarray | None = None
        self._row_of: dict[str, int] | None = None
        #: the fence its shard writers carry (a run's lease token, or ``claim:<token>``; see extract.lock)
        self.lease: str | None = None
        #: written by several runs at once (the shared cache): a runner leaves its attributes alone
        self.shared = False
        #: it was ``complete`` when this run opened it: only the shards the run writes need reading back
        self.verified_before = False

    # -- identity ---------------------------------------------------------------------------
    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.group.attrs)

    @property
    def segments(self) -> int:
        return int(self.group.attrs["segments"])

    @property
    def fingerprint(self) -> str:
        return str(self.group.attrs.get("fingerprint", ""))

    @property
    def rows_per_shard(self) -> int:
        return int(self.group.attrs["layout"]["rows_per_shard"])

    @property
    def ids(self) -> np.ndarray:
        if self._ids is None:
            self._ids = np.array(self.group["ids"][:].tolist(), dtype=str)
        return self._ids

    def __len__(self) -> int:
        return int(self.group["ids"].shape[0])

    def row_of(self, key: str) -> int:
        """Row index of ``key``; KeyError naming the store if absent."""
        if self._row_of is None:
            self._row_of = {k: i for i, k in enumerate(self.ids.tolist())}
        try:
            return self._row_of[key]
        except KeyError:
            raise KeyError(f"{key!r} is not a row of the store {self.path}") from None

    def array_names(self) -> list[str]:
        return sorted(name for name, _ in self.group.arrays())

    def array(self, name: str):
        try:
            return self.group[name]
        except KeyError:
            raise StoreError(f"{self.path}: no array {name!r} (has: {', '.join(self.array_names())})") from None

    # -- reading ----------------------------------------------------------------------------
    def read(self, name: str, rows: slice | Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Read rows of array ``name`` (all rows by default) as a numpy array."""
        arr = self.array(name)
        if rows is None:
            return np.asarray(arr[:])
        if isinstance(rows, slice):
            return np.asarray(arr[rows])
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            return np.zeros((0,) + tuple(arr.shape[1:]), dtype=arr.dtype)
        order = np.argsort(rows, kind="stable")
        out = np.asarray(arr.get_orthogonal_selection((rows[order],)))
        inverse = np.empty_like(order)
        inverse[order] = np.arange(order.size)
        return out[inverse]

    def read_scaled(self, name: str, rows: slice | Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """:meth:`read` of a map array stored as float16 with a per-row scale ``<name>_scale`` [N]
        (``frame_maps``, ``audio_maps``; see :mod:`extract.sol_extractors`): the values are
        ``stored * scale`` (:meth:`scaled`)."""
        return self.scaled(name, self.read(name, rows), rows)

    def scaled(self, name: str, values: np.ndarray, rows: slice | Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """``values`` [R, ...] read from map array ``name`` (whole rows, or parts of them such as one
        second per row), times the recorded scale ``<name>_scale`` of each of their ``rows`` (the
        store row of each leading index, repeats allowed). The one rule of the scaled maps, for
        stage 1's :meth:`read_scaled` and stage 2's partial reads alike: returns ``values``
        unchanged (float16) when every scale is 1 (or 0: a row never written, all zeros) or the
        store has no scale array; otherwise float32, each row multiplied by its scale."""
        scale_name = f"{name}_scale"
        if scale_name not in self.group:
            return values
        scale = np.asarray(self.read(scale_name, rows), dtype=np.float32)
        scale = np.where(scale > 0, scale, np.float32(1.0))
        if np.all(scale == 1.0):
            return values
        return values.astype(np.float32) * scale.reshape(scale.shape + (1,) * (values.ndim - scale.ndim))

    def status(self) -> np.ndarray:
        return np.asarray(self.group["status"][:], dtype=np.int8)

    def reasons(self) -> np.ndarray:
        return np.array(self.group["reason"][:].tolist(), dtype=str)

    def records(self, name: str) -> np.ndarray:
        """A per-row string record (``source``, ``ran``, ``reason``); all "" if the store predates it."""
        if name not in self.group:
            return np.full(len(self), "", dtype=object)
        return np.array(self.group[name][:].tolist(), dtype=object)

    def feature_names(self) -> list[str]:
        """Every per-row array that is not bookkeeping (``valid`` and the extractors' arrays)."""
        return [name for name in self.array_names() if name not in BOOKKEEPING]

    def summary(self) -> dict[str, int]:
        status = self.status()
        return {STATUS_NAMES[k]: int((status == k).sum()) for k in STATUS_NAMES}

    # -- writing (one writer per shard!) -----------------------------------------------------
    def shard_of(self, row: int) -> int:
        return row // self.rows_per_shard

    def shard_rows(self, shard: int) -> range:
        start = shard * self.rows_per_shard
        return range(start, min(start + self.rows_per_shard, len(self)))

    @property
    def num_shards(self) -> int:
        return -(-len(self) // self.rows_per_shard)

    def write_shard(self, shard: int, values: Mapping[str, np.ndarray], status: np.ndarray, reason: Sequence[str],
                    records: Mapping[str, Sequence[str]] | None = None) -> None:
        """Write every row of shard ``shard`` at once: feature arrays first, then the row records
        (``source``, ``ran``), reason, and status last.

        ``values[name]`` has shape [rows of the shard, *row_shape]. Status is written last, so a
        crash in between leaves the rows "missing" and they are recomputed on resume.
        """
        rows = self.shard_rows(shard)
        sl = slice(rows.start, rows.stop)
        for name, value in values.items():
            arr = self.array(name)
            value = np.asarray(value)
            if value.shape != (len(rows),) + tuple(arr.shape[1:]):
                raise StoreError(f"{self.path}/{name}: shard {shard} expects {(len(rows),) + tuple(arr.shape[1:])}, got {value.shape}")
            arr[sl] = value.astype(arr.dtype, copy=False)
        for name, texts in (records or {}).items():
            if name in self.group:
                self.group[name][sl] = _strings(texts)
        self.group["reason"][sl] = _strings(reason)
        self.group["status"][sl] = np.asarray(status, dtype=np.int8)

    # -- growth (the creator/driver only, holding the store's lock) -------------------------
    def grow(self, new_keys: Sequence[str], *, _after_step=None) -> None:
        """Append rows ``new_keys`` (status missing) to every array.

        Order: every other array first, then ``ids`` (resized and written), then the ``num_rows``
        attribute. ``ids`` is the commit point: a kill before it leaves arrays longer than ``ids``,
        which :meth:`repair_growth` (run by every writer when it opens the store) cuts back, so the
        same command then proceeds as if the growth never started. ``_after_step(name)`` is a test
        hook called after each step.
        """
        if not new_keys:
            return
        old = len(self)
        total = old + len(new_keys)
        for name, arr in self.group.arrays():
            if name != "ids" and arr.shape[0] != total:
                arr.resize((total,) + tuple(arr.shape[1:]))
                if _after_step:
                    _after_step(name)
        ids = self.group["ids"]
        ids.resize((total,))
        ids[old:total] = _strings(new_keys)
        if _after_step:
            _after_step("ids")
        self.set_attrs(num_rows=total)
        self._ids = self._row_of = None
        log.info("%s: added %d rows (now %d)", self.path, len(new_keys), total)

    def repair_growth(self) -> list[str]:
        """Undo what an interrupted :meth:`grow` left (arrays longer than ``ids``, trailing empty
        ids of a resize whose values were never written) and add row-record arrays that stores
        from older avel versions lack. Returns what was repaired (empty: nothing to do)."""
        repaired = []
        ids = self.group["ids"]
        keys = np.array(ids[:].tolist(), dtype=object) if ids.shape[0] else np.zeros(0, dtype=object)
        n = len(keys)
        while n and keys[n - 1] == "":
            n -= 1
        if n != ids.shape[0]:
            ids.resize((n,))
            repaired.append(f"ids {len(keys)} -> {n} rows")
        for name, arr in self.group.arrays():
            if name != "ids" and arr.shape[0] != n:
                repaired.append(f"{name} {arr.shape[0]} -> {n} rows")
                arr.resize((n,) + tuple(arr.shape[1:]))
        for name in ROW_RECORDS:
            if name not in self.group:
                create_record_array(self.group, name, n, self.rows_per_shard)
                repaired.append(f"added the {name} record")
        if self.group.attrs.get("num_rows") != n:
            repaired.append(f"num_rows {self.group.attrs.get('num_rows')} -> {n}")
        if repaired:
            self.set_attrs(num_rows=n)
            self._ids = self._row_of = None
            log.warning("%s: repaired an interrupted update: %s", self.path, "; ".join(repaired))
        return repaired

    def set_attrs(self, **attrs: Any) -> None:
        """Update root attributes (the creator/driver only)."""
        self.group.attrs.update(_jsonable(attrs))


def _strings(values: Iterable[str]) -> np.ndarray:
    """Variable-length string array (Zarr v3 ``string`` data type)."""
    return np.asarray([str(v) for v in values], dtype=np.dtypes.StringDType())


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def create_store(
    path: str | Path,
    ids: Sequence[str],
    segments: int,
    specs: Iterable[ArraySpec],
    attrs: Mapping[str, Any],
    *,
    rows_per_shard: int = 16,
    compression_level: int = 3,
    overwrite: bool = False,
) -> FeatureStore:
    """Create a store with rows ``ids`` and the given per-row arrays, all rows "missing".

    ``attrs`` should carry ``extractor``, ``fingerprint``, ``weights``, ``versions``.
    """
    zarr = _zarr()
    path = Path(path)
    ids = [str(i) for i in ids]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise StoreError(f"{path}: duplicate row ids {dup}")
    if path.exists() and not overwrite:
        raise StoreError(f"{path} exists already; open it with open_store() or pass overwrite=True")
    n = len(ids)
    group = zarr.open_group(str(path), mode="w" if overwrite else "w-")
    S = max(1, int(rows_per_shard))
    comp = _compressors(compression_level)
    # every array has exactly n rows, also n = 0 (an empty manifest makes a valid, empty store)
    ids_array = group.create_array("ids", shape=(n,), dtype=str, chunks=(max(1, n),), fill_value="")
    if n:
        ids_array[:] = _strings(ids)
    for spec in specs:
        shape = (n,) + tuple(spec.row_shape)
        group.create_array(
            spec.name,
            shape=shape,
            dtype=spec.dtype,
            chunks=(1,) + tuple(spec.row_shape),
            shards=(S,) + tuple(spec.row_shape),
            compressors=comp,
            fill_value=False if spec.dtype == "bool" else 0,
        )
    group.create_array("status", shape=(n,), dtype="int8", chunks=(1,), shards=(S,), fill_value=0)
    for name in ("reason",) + ROW_RECORDS:
        create_record_array(group, name, n, S)
    layout = {"rows_per_shard": S, "chunk_rows": 1, "codec": f"zstd-{compression_level}"}
    group.attrs.update(
        _jsonable(
            {
                "schema": SCHEMA,
                "schema_version": SCHEMA_VERSION,
                "segments": int(segments),
                "num_rows": n,
                "layout": layout,
                **dict(attrs),
            }
        )
    )
    log.info("created store %s with %d rows, %d per shard", path, n, S)
    return FeatureStore(group, path)


def create_record_array(group, name: str, n: int, rows_per_shard: int) -> None:
    """A per-row string array (``reason``, ``source``, ``ran``), sharded like every other array."""
    group.create_array(name, shape=(n,), dtype=str, chunks=(1,), shards=(max(1, int(rows_per_shard)),), fill_value="")


def open_store(path: str | Path, mode: str = "r") -> FeatureStore:
    """Open an existing store; :class:`StoreError` naming the file if it is not one of ours."""
    zarr = _zarr()
    path = Path(path)
    if not path.exists():
        raise StoreError(f"{path}: no feature store there (run `avel-extract` first, or check store.path)")
    try:
        group = zarr.open_group(str(path), mode=mode)
    except Exception as exc:  # noqa: BLE001 - zarr raises several types
        raise StoreError(f"{path}: not a Zarr v3 group ({exc})") from None
    attrs = dict(group.attrs)
    if attrs.get("schema") != SCHEMA:
        raise StoreError(f"{path}: not an avel feature store (schema={attrs.get('schema')!r}, expected {SCHEMA!r})")
    version = attrs.get("schema_version")
    if version != SCHEMA_VERSION:
        raise StoreError(
            f"{path}: store schema version {version}, this avel reads version {SCHEMA_VERSION}; "
            "re-extract or use a matching avel release"
        )
    return FeatureStore(group, path)


def check_arrays(store: FeatureStore, expected: Iterable[ArraySpec]) -> None:
    """Refuse a store whose arrays are missing or have other row shapes/dtypes than ``expected``."""
    n = len(store)
    problems = []
    for spec in expected:
        try:
            arr = store.group[spec.name]
        except KeyError:
            problems.append(f"array {spec.name!r} is missing")
            continue
        want = (n,) + tuple(spec.row_shape)
        if tuple(arr.shape) != want:
            problems.append(f"{spec.name} has shape {tuple(arr.shape)}, expected {want}")
        if np.dtype(arr.dtype) != np.dtype(spec.dtype):
            problems.append(f"{spec.name} has dtype {arr.dtype}, expected {spec.dtype}")
    if problems:
        raise StoreError(f"{store.path}: " + "; ".join(problems))


# ------------------------------------------------------------------------------------------
# completeness (a store rule: readers refuse an incomplete store)


def _shard_file(store: FeatureStore, name: str, shard: int) -> Path:
    """The file of shard ``shard`` of array ``name`` (Zarr v3 default chunk key encoding)."""
    ndim = len(store.array(name).shape)
    return Path(store.path) / name / "c" / str(shard) / Path(*(["0"] * (ndim - 1)))


def verify_store(store: FeatureStore, shards: Sequence[int] | None = None) -> list[str]:
    """Problems that keep ``store`` from being complete (empty list: complete and readable).

    Checks: every row has a final status (done or failed); in every shard holding a row with a
    valid segment, every feature array's shard file exists (its features cannot all equal the
    fill value, so a missing file means lost writes); every shard of every array decodes. The
    status of every row is always checked, the files and decoding only for ``shards`` (default:
    all; a growing cache re-reads just the shards it wrote).
    """
    problems = []
    n = len(store)
    status = store.status()
    missing = int((status == STATUS_MISSING).sum())
    if missing:
        problems.append(f"{missing} of {n} rows are not extracted (status missing)")
    shards = range(store.num_shards) if shards is None else sorted(set(shards))
    valid = store.read("valid") if "valid" in store.array_names() else np.zeros((n, 1), bool)
    features = [name for name in store.feature_names() if name != "valid"]
    for shard in shards:
        rows = store.shard_rows(shard)
        if not valid[rows.start: rows.stop].any():
            continue
        lost = [name for name in ["valid"] + features if not _shard_file(store, name, shard).is_file()]
        if lost:
            problems.append(f"shard {shard}: the shard files of {', '.join(lost)} are missing")
    for name in store.array_names():
        arr = store.array(name)
        if arr.shape[0] != n:
            problems.append(f"array {name} has {arr.shape[0]} rows, the store {n}")
            continue
        blocks = [store.shard_rows(k) for k in shards] if name != "ids" else [range(0, n)]
        for rows in blocks:
            try:
                np.asarray(arr[rows.start: rows.stop])
            except Exception as exc:  # noqa: BLE001 - zarr/codec errors of a damaged shard
                problems.append(f"array {name}, rows {rows.start}-{rows.stop - 1}: unreadable ({type(exc).__name__}: {exc})")
    return problems


def mark_complete(store: FeatureStore, shards: Sequence[int] | None = None) -> list[str]:
    """Verify ``store`` (:func:`verify_store`, ``shards``: the ones written since it was last
    verified, default all) and set ``complete`` accordingly (the writer only, holding the store's
    lock). Returns the problems (empty: marked complete)."""
    problems = verify_store(store, shards)
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    store.set_attrs(complete=not problems, verified=now if not problems else None)
    if problems:
        log.warning("%s: not complete: %s", store.path, "; ".join(problems[:5]))
    return problems


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: obj}


def differing_fields(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two stores' ``fingerprint_fields`` attributes, as
    ``key: old -> new`` (what makes two feature sets differ; used by both stages)."""
    a, b = _flatten(json.loads(json.dumps(old))), _flatten(json.loads(json.dumps(new)))
    return [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def require_complete(store: FeatureStore) -> None:
    """Refuse a store whose ``complete`` attribute is false (rows still being added, or a run
    stopped before it verified the store). Stores without the attribute are accepted."""
    if store.attrs.get("complete") is False:
        raise StoreError(
            f"{store.path}: this feature set is incomplete (an avel-extract run is adding rows, or stopped before "
            "it verified the store); run the same avel-extract command again to finish it, then retry")


