"""The feature store contract: the only thing the two stages share.

A store is a Zarr v3 group per feature set (see README, "Feature store contract"):

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

    def status(self) -> np.ndarray:
        return np.asarray(self.group["status"][:], dtype=np.int8)

    def reasons(self) -> np.ndarray:
        return np.array(self.group["reason"][:].tolist(), dtype=str)

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

    def write_shard(self, shard: int, values: Mapping[str, np.ndarray], status: np.ndarray, reason: Sequence[str]) -> None:
        """Write every row of shard ``shard`` at once: feature arrays first, then status/reason.

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
        self.group["reason"][sl] = _strings(reason)
        self.group["status"][sl] = np.asarray(status, dtype=np.int8)

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
    n_alloc = max(n, 1)
    ids_array = group.create_array("ids", shape=(n,), dtype=str, chunks=(max(1, n),), fill_value="")
    if n:
        ids_array[:] = _strings(ids)
    for spec in specs:
        shape = (n_alloc,) + tuple(spec.row_shape)
        group.create_array(
            spec.name,
            shape=shape,
            dtype=spec.dtype,
            chunks=(1,) + tuple(spec.row_shape),
            shards=(S,) + tuple(spec.row_shape),
            compressors=comp,
            fill_value=False if spec.dtype == "bool" else 0,
        )
    group.create_array("status", shape=(n_alloc,), dtype="int8", chunks=(1,), shards=(S,), fill_value=0)
    group.create_array("reason", shape=(n_alloc,), dtype=str, chunks=(1,), shards=(S,), fill_value="")
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
