"""Import the public AVE feature files into a feature store.

The AVE release (Tian et al. 2018) ships ``visual_feature.h5`` ([4143, 10, 7, 7, 512], VGG-19
pool5 on ImageNet weights) and ``audio_feature.h5`` ([4143, 10, 128], VGGish on AudioSet), both
under the key ``avadataset``, row i = line i of ``Annotations.txt`` (header excluded). A store has
one row per video, so a video with several annotation lines (AVE: 45 videos with 2-3 events) takes
the features of its first line. Every imported row is ``valid`` and ``done``; the store's
attributes name the source files and their sha256.

A stage-1 job (it writes a store), so it lives in ``extract``; ``avel-extract import-h5`` calls
:func:`import_ave_h5`.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .ave import read_annotations
from .settings import fingerprint as config_fingerprint
from .store import STATUS_DONE, FeatureStore, StoreError, core_specs, create_store
from .weights import file_sha256

log = logging.getLogger(__name__)

H5_KEY = "avadataset"
WEIGHTS_IDENTITY = "AVE public features (VGG-19 ImageNet, VGGish AudioSet)"
VISUAL_ROW = (7, 7, 512)
AUDIO_ROW = (128,)


def _dataset(h5file, path: Path, row_shape: tuple[int, ...]):
    """The ``avadataset`` dataset of an open h5 file, checked to be [N, T, *row_shape]."""
    if H5_KEY not in h5file:
        raise StoreError(f"{path}: no dataset {H5_KEY!r} (has: {', '.join(h5file.keys()) or 'nothing'}); expected an AVE feature file")
    ds = h5file[H5_KEY]
    if ds.ndim != 2 + len(row_shape) or tuple(ds.shape[2:]) != row_shape:
        raise StoreError(f"{path}: {H5_KEY} has shape {tuple(ds.shape)}, expected [N, T, {', '.join(map(str, row_shape))}]")
    return ds


def first_rows(video_ids: list[str]) -> tuple[list[str], np.ndarray]:
    """Distinct video ids in order of first appearance and the row of each first appearance."""
    first: dict[str, int] = {}
    for row, vid in enumerate(video_ids):
        first.setdefault(vid, row)
    return list(first), np.asarray(list(first.values()), dtype=np.int64)


def import_ave_h5(
    visual_h5: str | Path,
    audio_h5: str | Path,
    annotations: str | Path,
    store_path: str | Path,
    *,
    rows_per_shard: int = 16,
    compression_level: int = 3,
    overwrite: bool = False,
) -> FeatureStore:
    """Create ``store_path`` from the two h5 files; returns the opened store.

    Raises StoreError naming the file when a key, shape or row count does not match.
    """
    import h5py

    visual_h5, audio_h5, annotations = Path(visual_h5), Path(audio_h5), Path(annotations)
    lines = read_annotations(annotations)
    ids, src_rows = first_rows([line.video_id for line in lines])
    with h5py.File(visual_h5, "r") as fv, h5py.File(audio_h5, "r") as fa:
        vis = _dataset(fv, visual_h5, VISUAL_ROW)
        aud = _dataset(fa, audio_h5, AUDIO_ROW)
        for path, ds in ((visual_h5, vis), (audio_h5, aud)):
            if ds.shape[0] != len(lines):
                raise StoreError(f"{path}: {ds.shape[0]} rows, but {annotations} has {len(lines)} annotation lines; use the matching Annotations.txt")
        if vis.shape[1] != aud.shape[1]:
            raise StoreError(f"{visual_h5} has T={vis.shape[1]} segments but {audio_h5} has T={aud.shape[1]}")
        T = int(vis.shape[1])
        log.info("hashing %s and %s", visual_h5, audio_h5)
        sources = {
            "visual": {"file": str(visual_h5.resolve()), "sha256": file_sha256(visual_h5), "key": H5_KEY, "dtype": str(vis.dtype)},
            "audio": {"file": str(audio_h5.resolve()), "sha256": file_sha256(audio_h5), "key": H5_KEY, "dtype": str(aud.dtype)},
            "annotations": {"file": str(annotations.resolve()), "sha256": file_sha256(annotations)},
        }
        store = create_store(
            store_path, ids, T, core_specs(T), store_attrs(sources, len(lines)),
            rows_per_shard=rows_per_shard, compression_level=compression_level, overwrite=overwrite,
        )
        for shard in range(store.num_shards):
            rows = store.shard_rows(shard)
            src = src_rows[rows.start : rows.stop]  # increasing, as h5py fancy indexing needs
            values = {
                "visual": np.asarray(vis[src]).astype(np.float16),
                "audio": np.asarray(aud[src]).astype(np.float32),
                "valid": np.ones((len(rows), T), dtype=bool),
            }
            store.write_shard(shard, values, np.full(len(rows), STATUS_DONE, np.int8), [""] * len(rows))
    log.info("imported %d videos (%d annotation rows) into %s", len(ids), len(lines), store.path)
    return store


def store_attrs(sources: dict, annotation_rows: int) -> dict:
    """Store attributes of an import: where the features came from and what made them."""
    import h5py
    import zarr

    extractor = {
        "source": "ave-public-h5",
        "description": "imported from the public AVE feature files; visual cast float32 -> float16 by the store contract",
        "annotation_rows": annotation_rows,
        "rows": "one per video: the first annotation line of each video",
    }
    identity = {"source": "ave-public-h5", "visual_sha256": sources["visual"]["sha256"], "audio_sha256": sources["audio"]["sha256"]}
    return {
        "extractor": extractor,
        "sources": sources,
        "fingerprint": config_fingerprint(identity),
        "weights": {
            "identity": WEIGHTS_IDENTITY,
            "visual": {"name": "VGG-19 pool5, ImageNet (AVE public features)", "sha256": sources["visual"]["sha256"]},
            "audio": {"name": "VGGish, AudioSet (AVE public features)", "sha256": sources["audio"]["sha256"]},
        },
        "versions": {"numpy": np.__version__, "h5py": h5py.__version__, "zarr": zarr.__version__},
    }
