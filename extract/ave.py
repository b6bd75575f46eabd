"""Convert the official AVE annotation files into avel manifests.

Inputs (the AVE release; a copy sits in ``../shared/ave`` for tests): ``Annotations.txt`` with or
without its header line, and ``trainSet.txt``, ``valSet.txt``, ``testSet.txt``. Every line is
``Category&VideoID&Quality&StartTime&EndTime``. The split files are lines of Annotations.txt.

Class index = order of first appearance in Annotations.txt (Church bell = 0 ... Mandolin = 27);
background = 28. One sample per annotation line (45 videos carry 2-3 events); ``sample_id`` is
``ave<row>``, the zero-based row of the (headerless) Annotations.txt, which is also the row of the
public ``*_feature.h5`` files.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from .core.manifest import ManifestError, Sample, write_manifest

log = logging.getLogger(__name__)

SPLIT_FILES = {"train": "trainSet.txt", "val": "valSet.txt", "test": "testSet.txt"}
HEADER_PREFIX = "Category&VideoID"


@dataclasses.dataclass(frozen=True)
class AveLine:
    row: int
    category: str
    video_id: str
    quality: str
    start: int
    end: int

    @property
    def text(self) -> str:
        return f"{self.category}&{self.video_id}&{self.quality}&{self.start}&{self.end}"


def _data_lines(path: Path) -> list[tuple[int, str]]:
    if not path.is_file():
        raise ManifestError(f"{path}: not found (expected the AVE file {path.name})")
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    out = []
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if not line or line.startswith(HEADER_PREFIX):
            continue
        out.append((number, line))
    return out


def parse_line(text: str, where: str, row: int = -1) -> AveLine:
    parts = text.split("&")
    if len(parts) != 5:
        raise ManifestError(f"{where}: expected Category&VideoID&Quality&Start&End, got {text!r}")
    category, video_id, quality, start, end = (p.strip() for p in parts)
    try:
        onset, offset = int(start), int(end)
    except ValueError:
        raise ManifestError(f"{where}: start/end must be integers, got {start!r}, {end!r}") from None
    return AveLine(row, category, video_id, quality, onset, offset)


def read_annotations(path: str | Path) -> list[AveLine]:
    path = Path(path)
    return [parse_line(text, f"{path}:{num}", row) for row, (num, text) in enumerate(_data_lines(path))]


def class_order(lines: list[AveLine]) -> list[str]:
    """Categories in order of first appearance."""
    return list(dict.fromkeys(line.category for line in lines))


def assign_split_rows(annotations: list[AveLine], split_file: Path) -> list[int]:
    """Rows of Annotations.txt that the split file lists, in the split file's order.

    Identical lines are matched to annotation rows in order, so duplicates stay distinct.
    """
    by_text: dict[str, list[int]] = {}
    for line in annotations:
        by_text.setdefault(line.text, []).append(line.row)
    rows = []
    for num, text in _data_lines(split_file):
        norm = parse_line(text, f"{split_file}:{num}").text
        candidates = by_text.get(norm)
        if not candidates:
            raise ManifestError(f"{split_file}:{num}: line {text!r} is not in Annotations.txt")
        rows.append(candidates.pop(0))
    return rows


def convert_ave(src: str | Path, out: str | Path, video_ext: str = ".mp4") -> dict[str, int]:
    """Write ``out/{train,val,test}.csv`` and ``out/classes.txt``; returns samples per split."""
    src, out = Path(src), Path(out)
    annotations = read_annotations(src / "Annotations.txt")
    classes = class_order(annotations)
    counts = {}
    for split, filename in SPLIT_FILES.items():
        rows = assign_split_rows(annotations, src / filename)
        samples = [
            Sample(
                sample_id=f"ave{line.row:04d}",
                video_id=line.video_id,
                path=f"{line.video_id}{video_ext}",
                category=line.category,
                onset=line.start,
                offset=line.end,
                split=split,
            )
            for line in (annotations[r] for r in rows)
        ]
        write_manifest(out / f"{split}.csv", samples, classes)
        counts[split] = len(samples)
        log.info("%s: %d samples -> %s", split, len(samples), out / f"{split}.csv")
    return counts
