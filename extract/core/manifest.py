"""Manifests: one CSV row per sample, the format both stages read (see manifests/README.md).

Columns: ``sample_id, video_id, path, category, onset, offset, split`` and optional
``start, duration``. ``onset``/``offset`` are integer seconds relative to the window start; the
event covers ``onset <= t < offset``; an empty ``category`` means no event. The class list is
``classes.txt`` beside the manifest (one name per line, index = line number); background is the
index after the last class.

Feature rows are keyed per video window (:func:`feature_key`): samples of the same video and
window share one row of the store.

Imports nothing heavy.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import logging
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("sample_id", "video_id", "path", "category", "onset", "offset", "split")
OPTIONAL_COLUMNS = ("start", "duration")
COLUMNS = REQUIRED_COLUMNS + OPTIONAL_COLUMNS
CLASSES_FILE = "classes.txt"


class ManifestError(ValueError):
    """A manifest is malformed; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class Sample:
    """One manifest row. ``start``/``duration`` are the window of the video, in seconds."""

    sample_id: str
    video_id: str
    path: str
    category: str
    onset: int
    offset: int
    split: str
    start: float = 0.0
    duration: float | None = None

    @property
    def key(self) -> str:
        return feature_key(self.video_id, self.start, self.duration)


def feature_key(video_id: str, start: float = 0.0, duration: float | None = None) -> str:
    """Store row key of a video window: ``video_id`` alone for the default window."""
    if not start and duration is None:
        return video_id
    dur = "" if duration is None else f"{duration:g}"
    return f"{video_id}@{start:g}+{dur}"


@dataclasses.dataclass
class Manifest:
    """Samples of one manifest file plus the dataset's class list."""

    samples: list[Sample]
    classes: list[str]
    path: Path | None = None

    @property
    def num_classes(self) -> int:
        """Event classes, background excluded."""
        return len(self.classes)

    @property
    def background(self) -> int:
        return len(self.classes)

    def class_index(self, category: str) -> int:
        if not category:
            return self.background
        try:
            return self.classes.index(category)
        except ValueError:
            raise ManifestError(f"{self.path}: category {category!r} is not in {CLASSES_FILE}") from None

    def keys(self) -> list[str]:
        """Distinct feature keys in order of first appearance."""
        return list(dict.fromkeys(s.key for s in self.samples))

    def videos(self) -> list[Sample]:
        """One sample per distinct feature key (the first), e.g. for extraction."""
        seen: dict[str, Sample] = {}
        for s in self.samples:
            seen.setdefault(s.key, s)
        return list(seen.values())

    def segment_labels(self, segments: int) -> np.ndarray:
        """[num_samples, T] int64: class index where onset <= t < offset, else background."""
        out = np.full((len(self.samples), segments), self.background, dtype=np.int64)
        for i, s in enumerate(self.samples):
            if s.category:
                lo, hi = max(0, s.onset), min(segments, s.offset)
                out[i, lo:hi] = self.class_index(s.category)
        return out

    def video_labels(self) -> np.ndarray:
        """[num_samples] int64: the sample's event class (background if it has none)."""
        return np.asarray([self.class_index(s.category) for s in self.samples], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.samples)


def _int_field(value: str, name: str, where: str) -> int:
    try:
        number = float(value)
    except ValueError:
        raise ManifestError(f"{where}: {name}={value!r} is not a number") from None
    if number != int(number):
        raise ManifestError(f"{where}: {name}={value!r} must be whole seconds")
    return int(number)


def parse_sample(row: dict[str, str], where: str) -> Sample:
    """Validate one CSV row (``where`` = "file:line" for messages)."""
    missing = [c for c in REQUIRED_COLUMNS if c not in row or row[c] is None]
    if missing:
        raise ManifestError(f"{where}: missing columns {missing}")
    onset = _int_field(row["onset"] or "0", "onset", where)
    offset = _int_field(row["offset"] or "0", "offset", where)
    if onset < 0 or offset < onset:
        raise ManifestError(f"{where}: need 0 <= onset <= offset, got onset={onset} offset={offset}")
    start = float(row.get("start") or 0.0)
    duration_raw = row.get("duration") or ""
    duration = float(duration_raw) if duration_raw.strip() else None
    if start < 0 or (duration is not None and duration <= 0):
        raise ManifestError(f"{where}: need start >= 0 and duration > 0, got start={start} duration={duration}")
    for col in ("sample_id", "video_id", "path"):
        if not row[col].strip():
            raise ManifestError(f"{where}: empty {col}")
    return Sample(
        sample_id=row["sample_id"].strip(),
        video_id=row["video_id"].strip(),
        path=row["path"].strip(),
        category=row["category"].strip(),
        onset=onset,
        offset=offset,
        split=row["split"].strip(),
        start=start,
        duration=duration,
    )


def read_classes(path: str | Path) -> list[str]:
    lines = [ln.strip() for ln in Path(path).read_text().splitlines()]
    classes = [ln for ln in lines if ln]
    if len(set(classes)) != len(classes):
        raise ManifestError(f"{path}: duplicate class names")
    return classes


def read_manifest(path: str | Path, classes: Sequence[str] | None = None) -> Manifest:
    """Read a manifest CSV; classes from ``classes`` or ``classes.txt`` beside it, else in order
    of first appearance in the file."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise ManifestError(f"{path}: missing columns {missing} (has {header})")
        samples = [parse_sample(row, f"{path}:{i + 2}") for i, row in enumerate(reader)]
    ids = [s.sample_id for s in samples]
    if len(set(ids)) != len(ids):
        raise ManifestError(f"{path}: duplicate sample_id values")
    if classes is None:
        beside = path.parent / CLASSES_FILE
        if beside.is_file():
            classes = read_classes(beside)
        else:
            classes = list(dict.fromkeys(s.category for s in samples if s.category))
    manifest = Manifest(samples, list(classes), path)
    for s in samples:
        manifest.class_index(s.category)  # validates
    return manifest


def write_manifest(path: str | Path, samples: Iterable[Sample], classes: Sequence[str] | None = None) -> Path:
    """Write samples as CSV (and ``classes.txt`` beside it when ``classes`` is given)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for s in samples:
        writer.writerow(
            [s.sample_id, s.video_id, s.path, s.category, s.onset, s.offset, s.split,
             f"{s.start:g}", "" if s.duration is None else f"{s.duration:g}"]
        )
    path.write_text(buf.getvalue())
    if classes is not None:
        (path.parent / CLASSES_FILE).write_text("".join(f"{c}\n" for c in classes))
    return path
