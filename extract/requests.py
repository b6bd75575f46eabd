"""What to extract: the video windows of ``--split`` (comma list / all) or ``--manifest``.

Paths become absolute here, once: Dask workers run in other working directories (and on other
hosts), so every later stage sees absolute paths. One :class:`~extract.decode.VideoRequest` per
distinct feature key (the first request of a key wins).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

from .decode import VideoRequest
from .core.settings import ConfigError

log = logging.getLogger(__name__)

__all__ = ["resolve_splits", "requests_from_manifest", "collect_requests", "distinct_requests"]


def resolve_splits(pipeline, split: str) -> list[str]:
    """``"train"``, ``"train,val"`` or ``"all"`` (every configured split) -> split names."""
    configured = list(pipeline.data.splits)
    if split.strip() == "all":
        if not configured:
            raise ConfigError("--split all: no splits are configured under data.splits in pipeline.yaml")
        return configured
    names = [s.strip() for s in split.split(",") if s.strip()]
    if not names:
        raise ConfigError(f"--split {split!r}: give a split name, a comma list or 'all'")
    for name in names:
        pipeline.split(name)  # ConfigError naming the known splits
    return names


def requests_from_manifest(manifest_path: str | os.PathLike, video_root: str | os.PathLike | None) -> list[VideoRequest]:
    """One :class:`VideoRequest` per distinct feature key of a manifest; paths resolved against
    ``video_root`` (default: the manifest's folder)."""
    from .core.manifest import read_manifest

    manifest = read_manifest(manifest_path)
    # absolute from here on: Dask workers run in other working directories (and on other hosts)
    root = Path(os.path.abspath(os.path.expanduser(video_root if video_root else Path(manifest_path).parent)))
    out = []
    for sample in manifest.videos():
        path = Path(os.path.expanduser(sample.path))
        out.append(VideoRequest(sample.key, os.path.normpath(str(path if path.is_absolute() else root / path)),
                                sample.start, sample.duration))
    return out


def collect_requests(pipeline, split: str | None = None, manifest: str | None = None,
                     video_root: str | None = None) -> list[VideoRequest]:
    """The video windows of ``--split`` (comma list / all) or ``--manifest``, distinct keys in order."""
    sources: list[tuple[Path, Path | None]] = []
    if manifest:
        sources.append((Path(manifest), Path(video_root) if video_root else None))
    if split:
        for name in resolve_splits(pipeline, split):
            cfg = pipeline.split(name)
            if not cfg.manifest:
                raise ConfigError(f"data.splits.{name}.manifest is empty; set it in pipeline.yaml")
            root = video_root or (pipeline.path(cfg.video_root) if cfg.video_root else None)
            sources.append((pipeline.path(cfg.manifest), Path(root) if root else None))
    if not sources:
        raise ConfigError("nothing to extract: give --split NAME or --manifest FILE")
    seen: dict[str, VideoRequest] = {}
    for path, root in sources:
        for request in requests_from_manifest(path, root):
            first = seen.setdefault(request.key, request)
            if first.path != request.path:
                log.warning("%s: key %r also comes from %s; keeping %s", path, request.key, request.path, first.path)
    return list(seen.values())


def distinct_requests(requests: Sequence[VideoRequest], allow_empty: bool = False) -> list[VideoRequest]:
    """``requests`` without repeated keys (the first request of a key wins), in order.

    Raises ``ConfigError`` when nothing is left, unless ``allow_empty``."""
    distinct: dict[str, VideoRequest] = {}
    for request in requests:
        distinct.setdefault(request.key, request)  # first wins
    if not distinct and not allow_empty:
        raise ConfigError("nothing to extract: the manifest(s) have no rows")
    return list(distinct.values())
