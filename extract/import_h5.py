"""Import the public AVE feature files into a feature store.

The AVE release (Tian et al. 2018) ships ``visual_feature.h5`` ([4143, 10, 7, 7, 512], VGG-19
pool5 on ImageNet weights) and ``audio_feature.h5`` ([4143, 10, 128], VGGish on AudioSet), both
under the key ``avadataset``, row i = line i of ``Annotations.txt`` (header excluded). A store has
one row per video, so a video with several annotation lines (AVE: 45 videos with 2-3 events) takes
the features of its first line. Every imported row is ``valid`` and ``done``.

**One feature set with the ``ave2018`` recipe.** The store records what made the files as an
extraction would: the extraction configuration of the ``ave2018`` recipe (``extractor``), the
extractors' identities with the weights identities ``vgg19-keras-imagenet`` (Keras VGG19
``imagenet``) and ``vggish-audioset`` (the AudioSet VGGish release), and the fingerprint computed
from them (:mod:`extract.provenance`). An ``ave2018`` extraction with those weights files has the
same fingerprint, so ``avel-predict`` computes a new video's features for a head trained on the
imported store, and ``avel-extract --recipe ave2018`` adds videos to it. Which configuration and
weights made the files can be declared (``extract_cfg``; ``avel-extract import-h5 --recipe,
--visual-weights, --audio-weights``): a file path is identified by its sha256 (the file must
exist), the canonical words need no file. The source files, their sha256 and the annotation rows
are recorded under ``imported``.

A stage-1 job (it writes a store), so it lives in ``extract``; ``avel-extract import-h5`` calls
:func:`import_ave_h5`.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np

from .ave import read_annotations
from .core.store import STATUS_DONE, FeatureStore, StoreError, core_specs, create_store
from .weights import file_sha256

log = logging.getLogger(__name__)

H5_KEY = "avadataset"
#: what the public files are, in words (``imported.description``)
WEIGHTS_IDENTITY = "AVE public features (VGG-19 Keras imagenet, VGGish AudioSet)"
VISUAL_ROW = (7, 7, 512)
AUDIO_ROW = (128,)
#: the extractors whose arrays the two files hold
IMPORTED_EXTRACTORS = ["vgg19", "vggish"]


def public_config(**overrides: Any):
    """The extraction configuration of the public files: the ``ave2018`` recipe resolved as
    pipeline.yaml would resolve it (``overrides``: explicit ``extract`` keys, e.g. weights)."""
    from .config import ExtractConfig
    from .core.settings import merge

    return merge(ExtractConfig(), {"recipe": "ave2018", **overrides}, "extract")


def declared_identities(cfg) -> dict[str, Any]:
    """``{extractor: identity}`` of ``cfg``'s vgg19 and vggish as an extraction would record them,
    the weights from :func:`extract.weights.declared_identity` (no canonical file needed)."""
    from .extractors import get_extractor
    from .weights import declared_identity

    if list(cfg.extractors) != IMPORTED_EXTRACTORS:
        raise StoreError(f"the AVE feature files hold the arrays of the extractors {IMPORTED_EXTRACTORS}; "
                         f"extract.extractors is {list(cfg.extractors)}")
    visual = {"vgg19": declared_identity(cfg.visual_weights, "vgg19", cfg.random_seed)}
    audio = {"vggish": declared_identity(cfg.audio_weights, "vggish", cfg.random_seed),
             "vggish_pca": declared_identity("random" if cfg.audio_weights == "random" else "vggish", "vggish_pca",
                                             cfg.random_seed) if cfg.vggish_pca else None}
    return {"vgg19": get_extractor("vgg19").describe(cfg, visual), "vggish": get_extractor("vggish").describe(cfg, audio)}


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
    extract_cfg=None,
    rows_per_shard: int = 16,
    compression_level: int = 3,
    overwrite: bool = False,
) -> FeatureStore:
    """Create ``store_path`` from the two h5 files; returns the opened store.

    ``extract_cfg``: the :class:`~extract.config.ExtractConfig` that made the files (default
    :func:`public_config`: the ``ave2018`` recipe with the Keras VGG-19 and AudioSet VGGish
    weights); its ``segments`` is set to the files' T. Raises StoreError naming the file when a
    key, shape or row count does not match.
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
        cfg = dataclasses.replace(extract_cfg if extract_cfg is not None else public_config(), segments=T)
        if VISUAL_ROW != (cfg.image_size // 32, cfg.image_size // 32, 512):
            raise StoreError(f"{visual_h5}: rows of {VISUAL_ROW} are pool5 maps of {VISUAL_ROW[0] * 32}-pixel frames, "
                             f"but the declared configuration has extract.image_size={cfg.image_size}")
        identities = declared_identities(cfg)
        log.info("hashing %s and %s", visual_h5, audio_h5)
        sources = {
            "visual": {"file": str(visual_h5.resolve()), "sha256": file_sha256(visual_h5), "key": H5_KEY, "dtype": str(vis.dtype)},
            "audio": {"file": str(audio_h5.resolve()), "sha256": file_sha256(audio_h5), "key": H5_KEY, "dtype": str(aud.dtype)},
            "annotations": {"file": str(annotations.resolve()), "sha256": file_sha256(annotations)},
        }
        store = create_store(
            store_path, ids, T, core_specs(T), store_attrs(cfg, identities, sources, len(lines)),
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


def store_attrs(cfg, identities: dict[str, Any], sources: dict, annotation_rows: int) -> dict:
    """Store attributes of an import: those of an extraction with ``cfg`` (configuration,
    identities, fingerprint: :func:`extract.provenance.store_attrs`) plus where the features came
    from (``imported``, ``sources``)."""
    import h5py

    from .provenance import store_attrs as extraction_attrs

    attrs = extraction_attrs(cfg, identities)
    attrs["imported"] = {
        "source": "ave-public-h5",
        "description": f"imported from {WEIGHTS_IDENTITY}; visual cast float32 -> float16 by the store contract",
        "annotation_rows": annotation_rows,
        "rows": "one per video: the first annotation line of each video",
        "h5py": h5py.__version__,
    }
    attrs["sources"] = sources
    return attrs
