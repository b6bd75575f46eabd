"""Training data: a checked feature store plus one manifest per split, held in memory.

The store's feature arrays are read ONCE into a :class:`FeatureBank` (one row per video window):

    audio  [R, T, 128]          float32
    visual [R, T, 7, 7, 512]    float16 (the store's dtype; cast to float32 per batch)
    valid  [R, T]               bool

and every split is a :class:`SplitData` that points into the bank (``rows`` [N]), so samples of
the same video share one feature row (AVE has 45 videos with 2-3 events) and nothing is copied.
With a GPU the whole bank sits on the device and a batch is an index_select there.

Errors are raised before any training starts: wrong schema/shape (:class:`extract.core.store.StoreError`
naming the store), manifest samples without a store row (:class:`DataError` listing them) and
samples whose row is not extracted yet (error, or skipped with a warning when
``train.skip_incomplete`` is true).
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from extract.core.manifest import Manifest, read_manifest
from extract.core.store import (BOOKKEEPING, STATUS_DONE, STATUS_NAMES, FeatureStore, StoreError, check_arrays, core_specs,
                           open_store, require_complete)

log = logging.getLogger(__name__)

#: rows read from the store per block while loading (bounds the extra memory of a read)
LOAD_BLOCK_ROWS = 256
#: how many offending keys an error message lists
LIST_LIMIT = 10


class DataError(ValueError):
    """A manifest and a store do not fit together; the message names both files."""


@dataclasses.dataclass
class FeatureBank:
    """Feature rows of one store in memory. ``keys[i]`` is the store id of row ``i``."""

    audio: torch.Tensor  # [R, T, 128] float32
    visual: torch.Tensor  # [R, T, 7, 7, 512] float16
    valid: torch.Tensor  # [R, T] bool
    keys: list[str]
    store_path: Path
    fingerprint: str
    attrs: dict
    #: [R] bool, host: every number of row i is finite (see :meth:`finite_rows`)
    finite: np.ndarray | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def segments(self) -> int:
        return int(self.audio.shape[1])

    def finite_rows(self) -> np.ndarray:
        """[R] bool on the host: row i's audio and visual numbers are all finite. Computed once
        (when the bank is loaded, else on first use), so that a training batch is checked from
        the host without waiting for the device."""
        if self.finite is None:
            self.finite = finite_rows(self.audio, self.visual)
        return self.finite

    @property
    def device(self) -> torch.device:
        return self.audio.device

    def nbytes(self) -> int:
        return sum(t.element_size() * t.nelement() for t in (self.audio, self.visual, self.valid))

    def to(self, device: torch.device | str) -> "FeatureBank":
        return dataclasses.replace(
            self, audio=self.audio.to(device), visual=self.visual.to(device), valid=self.valid.to(device)
        )


def finite_rows(*arrays: torch.Tensor, block: int = LOAD_BLOCK_ROWS) -> np.ndarray:
    """[R] bool: all numbers of row i of every array [R, ...] are finite (``block`` rows at a time,
    one transfer at the end)."""
    rows = int(arrays[0].shape[0])
    parts = []
    for start in range(0, rows, block):
        ok = torch.ones(min(block, rows - start), dtype=torch.bool, device=arrays[0].device)
        for array in arrays:
            ok &= torch.isfinite(array[start:start + block]).reshape(len(ok), -1).all(dim=1)
        parts.append(ok)
    return torch.cat(parts).cpu().numpy() if parts else np.zeros(0, bool)


@dataclasses.dataclass
class SplitData:
    """One split: per-sample labels and the bank row of each sample.

    ``rows`` [N] int64 (bank rows), ``labels`` [N, T] int64 (segment classes, background = C-1),
    ``video_labels`` [N] int64, ``valid`` [N, T] bool (segment has real features).
    """

    name: str
    manifest: Manifest
    sample_ids: list[str]
    rows: torch.Tensor
    labels: torch.Tensor
    video_labels: torch.Tensor
    valid: torch.Tensor
    skipped: list[str] = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def to(self, device: torch.device | str) -> "SplitData":
        return dataclasses.replace(
            self,
            rows=self.rows.to(device),
            labels=self.labels.to(device),
            video_labels=self.video_labels.to(device),
            valid=self.valid.to(device),
        )


@dataclasses.dataclass
class TaskData:
    """A bank plus its splits by name, and the class list (background last)."""

    bank: FeatureBank
    splits: dict[str, SplitData]
    classes: list[str]

    @property
    def num_classes(self) -> int:
        """Event classes + background (AVE: 29)."""
        return len(self.classes) + 1

    @property
    def class_names(self) -> list[str]:
        return list(self.classes) + ["background"]


# ---------------------------------------------------------------------------------------------
# store + manifest -> rows


def open_checked_store(path: str | Path, segments: int | None = None) -> FeatureStore:
    """Open a store and refuse it unless its core arrays match the contract (:func:`core_specs`).

    ``segments`` = the T the caller expects (None: the store's own). Raises StoreError naming the
    file and every mismatch.
    """
    store = open_store(path)
    require_complete(store)  # a feature set still being written (complete: false) is refused
    T = store.segments
    if segments is not None and T != segments:
        raise StoreError(f"{store.path}: store has T={T} segments per video, expected {segments}")
    check_arrays(store, core_specs(T))
    for name in ("ids", "status"):
        if name not in store.array_names():
            raise StoreError(f"{store.path}: array {name!r} is missing (not written by avel-extract?)")
    return store


def _listing(items: Sequence[str]) -> str:
    head = ", ".join(items[:LIST_LIMIT])
    more = f" and {len(items) - LIST_LIMIT} more" if len(items) > LIST_LIMIT else ""
    return head + more


def match_rows(store: FeatureStore, manifest: Manifest, skip_incomplete: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Store row of each manifest sample (by ``Sample.key``).

    Returns ``(keep, rows)``: indices of the samples kept and their store rows (int64). Samples
    without a row are always an error; samples whose row status is not done are an error unless
    ``skip_incomplete`` (then they are dropped and counted in a warning).
    """
    status = store.status()
    reasons = None
    missing, incomplete, keep, rows = [], [], [], []
    for i, sample in enumerate(manifest.samples):
        try:
            row = store.row_of(sample.key)
        except KeyError:
            missing.append(sample.key)
            continue
        if status[row] != STATUS_DONE:
            if reasons is None:
                reasons = store.reasons()
            why = STATUS_NAMES.get(int(status[row]), str(status[row]))
            detail = f": {reasons[row]}" if reasons[row] else ""
            incomplete.append(f"{sample.key} ({why}{detail})")
            continue
        keep.append(i)
        rows.append(row)
    if missing:
        raise DataError(
            f"{manifest.path}: {len(missing)} of {len(manifest)} samples have no row in the store "
            f"{store.path}: {_listing(missing)}. Extract them (avel-extract) or use the store made "
            "for this manifest."
        )
    if incomplete:
        if not skip_incomplete:
            raise DataError(
                f"{manifest.path}: {len(incomplete)} samples are not extracted in {store.path} "
                f"(status not done): {_listing(incomplete)}. Run avel-extract again to finish them, "
                "or train without them with --set train.skip_incomplete=true."
            )
        log.warning(
            "%s: skipping %d of %d samples whose store rows are not done: %s",
            manifest.path, len(incomplete), len(manifest), _listing(incomplete),
        )
    return np.asarray(keep, dtype=np.int64), np.asarray(rows, dtype=np.int64)


def read_rows(store: FeatureStore, name: str, rows: np.ndarray, block: int = LOAD_BLOCK_ROWS) -> np.ndarray:
    """Rows ``rows`` (sorted, unique) of array ``name``, read in contiguous blocks of ``block``
    store rows so that a subset never costs a full extra copy of the array."""
    arr = store.array(name)
    out = np.empty((len(rows),) + tuple(arr.shape[1:]), dtype=arr.dtype)
    if len(rows) == 0:
        return out
    start_pos = 0
    while start_pos < len(rows):
        lo = int(rows[start_pos])
        end_pos = int(np.searchsorted(rows, lo + block, side="left"))
        chunk = np.asarray(arr[lo : int(rows[end_pos - 1]) + 1])
        out[start_pos:end_pos] = chunk[rows[start_pos:end_pos] - lo]
        start_pos = end_pos
    return out


def load_bank(store: FeatureStore, rows: np.ndarray) -> FeatureBank:
    """Read ``rows`` (sorted unique store rows) of audio/visual/valid into memory, once."""
    rows = np.asarray(rows, dtype=np.int64)
    visual = torch.from_numpy(read_rows(store, "visual", rows))
    audio = torch.from_numpy(read_rows(store, "audio", rows).astype(np.float32, copy=False))
    valid = torch.from_numpy(read_rows(store, "valid", rows).astype(bool, copy=False))
    keys = store.ids[rows].tolist() if len(rows) else []
    return FeatureBank(audio, visual, valid, keys, Path(store.path), store.fingerprint, store.attrs)


def load_task_data(
    store_path: str | Path,
    manifests: dict[str, str | Path],
    *,
    skip_incomplete: bool = False,
    device: torch.device | str = "cpu",
) -> TaskData:
    """Check the store, match every split's manifest to it and load the rows they use.

    ``manifests`` = {split name: manifest CSV}. All manifests must share one class list.
    """
    store = open_checked_store(store_path)
    T = store.segments
    read = {name: read_manifest(path) for name, path in manifests.items()}
    classes = None
    for name, manifest in read.items():
        if classes is None:
            classes = manifest.classes
        elif manifest.classes != classes:
            raise DataError(f"{manifest.path}: its class list differs from the other splits' ({name})")
    matched = {name: match_rows(store, m, skip_incomplete) for name, m in read.items()}
    used = np.unique(np.concatenate([rows for _, rows in matched.values()] + [np.zeros(0, np.int64)]))
    log.info("loading %d feature rows of %s into memory", len(used), store.path)
    bank = load_bank(store, used)
    bank_row = {int(r): i for i, r in enumerate(used)}
    splits = {}
    for name, manifest in read.items():
        keep, rows = matched[name]
        splits[name] = make_split(name, manifest, keep, np.asarray([bank_row[int(r)] for r in rows], np.int64), bank, T)
    device = torch.device(device)
    log.info("features in memory: %.2f GB on %s", bank.nbytes() / 1e9, device)
    if device.type != "cpu":
        bank = bank.to(device)
        splits = {k: v.to(device) for k, v in splits.items()}
    bank.finite_rows()  # once, where the bank now lives: batches are then checked from the host
    return TaskData(bank, splits, list(classes or []))


def make_split(name: str, manifest: Manifest, keep: np.ndarray, bank_rows: np.ndarray, bank: FeatureBank, T: int) -> SplitData:
    """Labels of the kept samples of ``manifest`` and their bank rows."""
    labels = manifest.segment_labels(T)[keep]
    video_labels = manifest.video_labels()[keep]
    rows = torch.from_numpy(bank_rows)
    kept = set(keep.tolist())
    skipped = [s.sample_id for i, s in enumerate(manifest.samples) if i not in kept]
    return SplitData(
        name=name,
        manifest=manifest,
        sample_ids=[manifest.samples[i].sample_id for i in keep],
        rows=rows,
        labels=torch.from_numpy(labels),
        video_labels=torch.from_numpy(video_labels),
        valid=bank.valid[rows],
        skipped=skipped,
    )


# ---------------------------------------------------------------------------------------------
# batches


def make_batch(
    bank: FeatureBank, split: SplitData, index: torch.Tensor, staging: tuple[torch.Tensor, torch.Tensor] | None = None,
    device_index: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Batch of samples ``index`` (positions in ``split``: int64 numpy or CPU tensor), on the
    bank's device.

    Keys: ``audio`` [B, T, 128] f32, ``visual`` [B, T, 7, 7, 512] f32, ``labels`` [B, T],
    ``video_label`` [B], ``valid`` [B, T] on the bank's device, and ``index`` [B] (the positions,
    as given: on the host). ``device_index``: ``index`` already on the bank's device (else it is
    copied there, which waits for the device). ``staging`` = (float16, float32) buffers of at least B
    rows (CPU): the rows are gathered and cast into them instead of fresh tensors (see
    :func:`iterate_batches`).
    """
    if device_index is None:
        device_index = torch.as_tensor(index).to(split.rows.device)
    rows = split.rows[device_index]
    if staging is not None:
        half, full = (buf[: len(rows)] for buf in staging)
        # gather as int16: CPU index_select has no fast float16 kernel, the bits are the same
        torch.index_select(bank.visual.view(torch.int16), 0, rows, out=half.view(torch.int16))
        visual = full.copy_(half)
    else:
        visual = bank.visual[rows].float()
    return {
        "audio": bank.audio.index_select(0, rows),
        "visual": visual,
        "labels": split.labels[device_index],
        "video_label": split.video_labels[device_index],
        "valid": split.valid[device_index],
        "index": index,
    }


@dataclasses.dataclass(frozen=True)
class BatchOrder:
    """How one epoch walks the training split: ``shuffle`` = a new permutation drawn from the run's
    generator (else the split's order, the manifest's, every epoch); ``drop_last`` = leave out the
    last batch when it is smaller than the batch size (``n // batch_size`` batches, as the AVE-ECCV18
    and PSP scripts do)."""

    shuffle: bool = True
    drop_last: bool = False


def epoch_order(n: int, batch_size: int, order: BatchOrder, generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """The index batches of one epoch over ``n`` samples: positions [b] per batch, in the order of
    ``order`` (a shuffle draws one ``torch.randperm(n, generator=generator)``)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    perm = torch.randperm(n, generator=generator) if order.shuffle else torch.arange(n)
    stop = n - n % batch_size if order.drop_last else n
    return [perm[start:start + batch_size] for start in range(0, stop, batch_size)]


def epoch_batches(n: int, batch_size: int, order: BatchOrder, generator: torch.Generator | None,
                  device: torch.device) -> list[tuple[np.ndarray, torch.Tensor]]:
    """:func:`epoch_order`'s batches, each as (positions on the host: int64 numpy [b], the same
    positions on ``device`` [b]). The epoch's order is copied to the device once, not per batch, so
    drawing a batch never waits for the device."""
    batches = epoch_order(n, batch_size, order, generator)
    if not batches:
        return []
    flat = torch.cat(batches)
    on_device, host = flat.to(device, non_blocking=True), flat.numpy()
    out, start = [], 0
    for b in batches:
        out.append((host[start:start + len(b)], on_device[start:start + len(b)]))
        start += len(b)
    return out


def iterate_batches(
    bank: FeatureBank,
    split: SplitData,
    batch_size: int,
    *,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches over a split in order, or in a random order drawn from ``generator``
    (:func:`epoch_order`); ``drop_last`` leaves out a last batch smaller than ``batch_size``.

    The order is drawn on the host and copied to the bank's device once (not per batch), so
    drawing a batch never waits for the device (``index`` of a batch is a numpy slice of the
    order): on a GPU the gather and cast happen there, from the resident bank. On CPU the visual rows are gathered and cast into two staging buffers reused
    for every batch (a fresh 64 MB tensor per batch costs more than the cast itself): a batch is
    valid until the next one is drawn.
    """
    n = len(split)
    batches = epoch_batches(n, batch_size, BatchOrder(shuffle, drop_last), generator, split.rows.device)
    staging = None
    if bank.device.type == "cpu" and n > 0:
        shape = (min(batch_size, n),) + tuple(bank.visual.shape[1:])
        staging = (torch.empty(shape, dtype=bank.visual.dtype), torch.empty(shape, dtype=torch.float32))
    for host, on_device in batches:
        yield make_batch(bank, split, host, staging, on_device)


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda when available, else cpu; anything else as given; a CUDA device torch
    cannot use is a ValueError (:func:`extract.core.devices.resolve_device`, the one implementation)."""
    from extract.core.devices import resolve_device as resolve

    return torch.device(resolve(name, check=True))


# ---------------------------------------------------------------------------------------------
# from the pipeline

_CACHE: dict[tuple, TaskData] = {}


def split_manifest(pipeline, split_name: str) -> Path:
    """Manifest path of split ``split_name`` from pipeline.yaml's data.splits."""
    cfg = pipeline.split(split_name)
    if not cfg.manifest:
        raise DataError(f"data.splits.{split_name}.manifest is empty in {pipeline.source or 'the configuration'}")
    return pipeline.path(cfg.manifest)


def load_from_pipeline(pipeline, split_names: Sequence[str], device: torch.device | str = "cpu") -> TaskData:
    """:func:`load_task_data` for the store and splits of a pipeline; the last result is cached,
    so running several seeds reads the store once."""
    store_path = pipeline.path(pipeline.store.path)
    manifests = {name: split_manifest(pipeline, name) for name in dict.fromkeys(split_names)}
    key = (
        str(store_path.resolve()),
        store_token(store_path),
        tuple((n, str(p.resolve()), _mtime(p)) for n, p in manifests.items()),
        bool(pipeline.train.skip_incomplete),
        str(device),
    )
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = load_task_data(store_path, manifests, skip_incomplete=pipeline.train.skip_incomplete, device=device)
    return _CACHE[key]


#: the arrays :func:`load_task_data` reads besides the bookkeeping ones
BANK_ARRAYS = ("audio", "visual", "valid")


def store_token(store_path: Path, arrays: Sequence[str] = BANK_ARRAYS + BOOKKEEPING) -> str:
    """A digest that changes whenever a row the bank reads is rewritten: the store's attributes
    (``fingerprint``, ``complete``), and the path, size and modification time of every file of
    ``arrays`` (their metadata and every shard file; zarr replaces a shard file when one of its
    rows is written, so re-extracting a row in place changes its file's time and usually size,
    though neither the fingerprint nor any zarr.json changes)."""
    digest = hashlib.sha256()
    for name in ("zarr.json",) + tuple(arrays):
        root = store_path / name
        entries = [root] if root.is_file() else sorted(_files_under(root))
        for path in entries:
            st = path.stat()
            digest.update(f"{path.relative_to(store_path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _files_under(root: Path) -> Iterator[Path]:
    if not root.is_dir():
        return
    for entry in os.scandir(root):
        if entry.is_dir(follow_symlinks=False):
            yield from _files_under(Path(entry.path))
        else:
            yield Path(entry.path)


def _mtime(path: Path) -> int:
    return path.stat().st_mtime_ns if path.exists() else 0


def clear_cache() -> None:
    _CACHE.clear()
