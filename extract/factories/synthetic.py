"""Synthetic feature stores with learnable structure: the one factory behind the head table's
AVE-sized store (``python -m train.headtable --make-synthetic``), the training benchmark
(:mod:`train.bench`), the store read benchmark (:mod:`extract.factories.store_bench`) and the training tests.

Stage-1 plumbing: it writes through the store contract (:func:`extract.core.store.create_store`,
``write_shard``) and the manifest writer (:func:`extract.core.manifest.write_manifest`), like the
extractors do, so train/ may import it. Imports numpy only (zarr through the store).

:func:`make_synthetic` writes, under one folder::

    store.zarr (``store_name``)           visual [N, T, H, W, Cv] float16, audio [N, T, Ca] float32, valid
    manifests/<split>.csv, classes.txt    one Sample per manifest row (sample id = video id = store id)
    pipeline.yaml                         data.splits.<split>.manifest, store.path (+ extra sections)

Row layout: the splits in order; each split's ``background`` rows (if any) follow its event rows;
then the ``extra_ids`` (store rows no manifest uses). Each event row has one class ``k`` and one
contiguous window [onset, offset) of 2..T segments. On its event segments both modalities carry
the class prototype (visual: a non-negative [Cv] vector added on a random 3x3 patch of the map;
audio: a [Ca] vector); elsewhere noise only (visual ``|N(0, 1)| * noise``, audio
``N(0, 1) * noise``), except a ``one_modality_share`` of the background segments, which carry the
prototype in ONE modality and stay background (in AVE an event is both audible and visible).
Background-only rows (empty category, onset = offset = 0) have no event window; their
one-modality segments carry the prototype of their drawn class. Numbers are a function of the
arguments (``seed`` included) only.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..core.manifest import Sample, write_manifest
from ..core.store import STATUS_DONE, ArraySpec, FeatureStore, create_store

#: side of the square patch of the visual map that carries the prototype
PATCH = 3
#: length of the (norm of) the prototypes relative to unit-variance noise, per dimension
PROTOTYPE_SCALE = 1.5


@dataclasses.dataclass
class SyntheticStore:
    """What :func:`make_synthetic` wrote."""

    directory: Path
    store: Path
    pipeline: Path
    #: split -> manifest path
    manifests: dict[str, Path]
    #: split -> its manifest's samples, in store-row order
    samples: dict[str, list[Sample]]
    #: store row ids (manifest rows first, then the extra ids)
    ids: list[str]
    classes: list[str]
    #: class prototypes: visual [K, Cv], audio [K, Ca] (K = len(classes))
    proto_visual: np.ndarray
    proto_audio: np.ndarray


def feature_specs(segments: int, visual_shape: Sequence[int], audio_dim: int) -> list[ArraySpec]:
    """The contract's ``visual``, ``audio``, ``valid`` arrays with the given row shapes (the
    contract's own, :func:`extract.core.store.core_specs`, are (7, 7, 512) and 128)."""
    return [ArraySpec("visual", (segments, *visual_shape), "float16"), ArraySpec("audio", (segments, audio_dim), "float32"),
            ArraySpec("valid", (segments,), "bool")]


def write_rows(path: str | Path, ids: Sequence[str], segments: int,
               values: Mapping[str, np.ndarray] | Callable[[range], Mapping[str, np.ndarray]], *,
               status: Sequence[int] | None = None, attrs: Mapping[str, Any] | None = None,
               specs: Sequence[ArraySpec] | None = None, rows_per_shard: int = 4, compression_level: int = 1,
               overwrite: bool = False) -> FeatureStore:
    """Create a store with rows ``ids`` and write every shard.

    ``values``: whole arrays {name: [N, ...]} (sliced per shard), or a function of a shard's row
    range returning that shard's arrays (for stores too big to hold in memory; called once per
    shard, in order). ``status`` per row (default all done; failed rows get a reason).
    ``specs`` default: :func:`feature_specs` at the contract's shapes."""
    specs = list(specs) if specs is not None else feature_specs(segments, (7, 7, 512), 128)
    attrs = dict(attrs) if attrs is not None else {"fingerprint": "synthetic", "extractor": {"name": "extract.factories.synthetic"}}
    store = create_store(path, ids, segments, specs, attrs, rows_per_shard=rows_per_shard,
                         compression_level=compression_level, overwrite=overwrite)
    status = np.full(len(ids), STATUS_DONE, np.int8) if status is None else np.asarray(status, np.int8)
    for shard in range(store.num_shards):
        rows = store.shard_rows(shard)
        if callable(values):
            shard_values = values(rows)
        else:
            shard_values = {name: array[rows.start:rows.stop] for name, array in values.items()}
        st = status[rows.start:rows.stop]
        store.write_shard(shard, shard_values, st, ["decode error" if s == 2 else "" for s in st])
    return store


def draw_labels(rng: np.random.Generator, rows: int, classes: int, segments: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: class [rows], onset [rows], offset [rows] (2 <= offset - onset <= segments)."""
    cats = rng.integers(0, classes, rows)
    length = rng.integers(2, segments + 1, rows)
    onsets = rng.integers(0, segments - length + 1)
    return cats, onsets, onsets + length


def one_modality_mask(rng: np.random.Generator, onsets: np.ndarray, offsets: np.ndarray, segments: int,
                      share: float) -> np.ndarray:
    """[rows, T] int8: 0 = nothing, 1 = only the visual prototype, 2 = only the audio prototype,
    drawn for a ``share`` of the background segments (outside [onset, offset))."""
    t = np.arange(segments)[None, :]
    background = (t < onsets[:, None]) | (t >= offsets[:, None])
    chosen = background & (rng.random((len(onsets), segments)) < share)
    which = rng.integers(1, 3, (len(onsets), segments)).astype(np.int8)
    return np.where(chosen, which, 0).astype(np.int8)


def draw_features(rng: np.random.Generator, cats, onsets, offsets, one_modality, proto_visual, proto_audio,
                  visual_shape: Sequence[int], noise: float) -> dict[str, np.ndarray]:
    """The arrays of some rows (see the module docstring): visual [n, T, H, W, Cv] float16,
    audio [n, T, Ca] float32, valid [n, T] (all True)."""
    n, segments = one_modality.shape
    height, width, _ = visual_shape
    t = np.arange(segments)[None, :]
    event = (t >= onsets[:, None]) & (t < offsets[:, None])
    has_v = event | (one_modality == 1)
    has_a = event | (one_modality == 2)
    visual = np.abs(rng.standard_normal((n, segments, *visual_shape), dtype=np.float32)) * noise
    for i in range(n):
        y, x = rng.integers(0, min(height, width) - PATCH + 1, 2)
        visual[i, np.flatnonzero(has_v[i]), y:y + PATCH, x:x + PATCH, :] += proto_visual[cats[i]]
    audio = rng.standard_normal((n, segments, proto_audio.shape[1]), dtype=np.float32) * noise
    audio += has_a[:, :, None] * proto_audio[cats][:, None, :]
    return {"visual": visual.astype(np.float16), "audio": audio, "valid": np.ones((n, segments), bool)}


def make_synthetic(directory: str | Path, *, splits: Mapping[str, int], classes: Sequence[str], segments: int = 10,
                   background: Mapping[str, int] | None = None, extra_ids: Sequence[str] = (),
                   visual_shape: Sequence[int] = (7, 7, 512), audio_dim: int = 128, seed: int = 0,
                   noise: float = 1.0, one_modality_share: float = 0.0, balanced: bool = False, rows_per_shard: int = 64,
                   prototype_scale: float = PROTOTYPE_SCALE, mislabelled_share: float = 0.0,
                   events: Mapping[str, Sequence[tuple[int, int, int]]] | None = None,
                   id_prefix: str = "syn", store_name: str = "store.zarr", attrs: Mapping[str, Any] | None = None,
                   split_options: Mapping[str, Any] | None = None, pipeline_sections: Mapping[str, Any] | None = None,
                   pipeline_header: str = "") -> SyntheticStore:
    """Write a synthetic store, its manifests and ``pipeline.yaml`` under ``directory`` (layout,
    rows and features: the module docstring).

    ``splits``: event rows per split, in row order; ``background``: background-only rows per
    split (after that split's event rows); ``extra_ids``: store rows no manifest uses;
    ``split_options``: extra keys of every ``data.splits.<split>`` entry (e.g. ``video_root``);
    ``store_name``: the store's folder name under ``directory``;
    ``pipeline_sections``: further top-level sections of pipeline.yaml; ``pipeline_header``: a
    comment written first; ``balanced``: row i has class i mod K (else drawn at random; the rest
    of the numbers are the same either way); ``prototype_scale``: the prototypes' scale per dimension
    relative to unit-variance noise (smaller = harder to tell the classes apart);
    ``mislabelled_share``: that share of the event rows carries the prototype of another class than
    its label (drawn uniformly among the others), in every split: an error no model can avoid,
    which a model can only memorise on the training split (0 = none, and no extra draw);
    ``events``: per split, ``(class index, onset, offset)`` of each of its event rows (e.g. AVE's own
    annotations) in place of drawn ones; a split given must have as many as ``splits`` says."""
    import yaml

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    background = dict(background or {})
    unknown = set(background) - set(splits)
    if unknown:
        raise ValueError(f"background rows for unknown splits {sorted(unknown)}")
    sizes = {split: n + background.get(split, 0) for split, n in splits.items()}
    manifest_rows = sum(sizes.values())
    rows = manifest_rows + len(extra_ids)
    rng = np.random.default_rng(seed)
    classes = list(classes)
    ids = [f"{id_prefix}{i:05d}" for i in range(manifest_rows)] + list(extra_ids)
    cats, onsets, offsets = draw_labels(rng, rows, len(classes), segments)
    if balanced:
        cats = np.arange(rows) % len(classes)
    start = 0
    for split, n in splits.items():
        if events and split in events:
            given = np.asarray(events[split], dtype=np.int64).reshape(-1, 3)
            if len(given) != n:
                raise ValueError(f"events[{split!r}] has {len(given)} rows, splits[{split!r}] says {n}")
            if given[:, 0].min(initial=0) < 0 or given[:, 0].max(initial=0) >= len(classes):
                raise ValueError(f"events[{split!r}]: class indices must be in [0, {len(classes)})")
            cats[start:start + n], onsets[start:start + n], offsets[start:start + n] = given.T
        start += sizes[split]
    feature_cats = cats
    if mislabelled_share > 0:
        shifted = rng.random(rows) < mislabelled_share
        feature_cats = np.where(shifted, (cats + rng.integers(1, len(classes), rows)) % len(classes), cats)
    background_only = np.zeros(rows, bool)
    start = 0
    for split, n in splits.items():
        background_only[start + n:start + sizes[split]] = True
        start += sizes[split]
    background_only[manifest_rows:] = True
    onsets[background_only] = offsets[background_only] = 0
    one_modality = one_modality_mask(rng, onsets, offsets, segments, one_modality_share)
    proto_visual = np.abs(rng.standard_normal((len(classes), visual_shape[-1]), dtype=np.float32)) * prototype_scale
    proto_audio = rng.standard_normal((len(classes), audio_dim), dtype=np.float32) * prototype_scale

    manifests, samples, start = {}, {}, 0
    for split, size in sizes.items():
        samples[split] = [Sample(ids[i], ids[i], f"{ids[i]}.mp4", "" if background_only[i] else classes[cats[i]],
                                 int(onsets[i]), int(offsets[i]), split) for i in range(start, start + size)]
        manifests[split] = write_manifest(directory / "manifests" / f"{split}.csv", samples[split], classes)
        start += size

    def shard_values(r: range) -> dict[str, np.ndarray]:
        sl = slice(r.start, r.stop)
        return draw_features(rng, feature_cats[sl], onsets[sl], offsets[sl], one_modality[sl], proto_visual, proto_audio,
                             visual_shape, noise)

    attrs = dict(attrs) if attrs is not None else {
        "fingerprint": f"synthetic-{seed}", "extractor": {"name": "extract.factories.synthetic"},
        "weights": {"visual": "synthetic", "audio": "synthetic"}, "versions": {}}
    store_path = directory / store_name
    write_rows(store_path, ids, segments, shard_values, attrs=attrs, specs=feature_specs(segments, visual_shape, audio_dim),
               rows_per_shard=rows_per_shard, overwrite=True)
    pipeline = {"data": {"splits": {s: {"manifest": f"manifests/{s}.csv", **(split_options or {})} for s in sizes}},
                "store": {"path": store_name}, **(pipeline_sections or {})}
    (directory / "pipeline.yaml").write_text(pipeline_header + yaml.safe_dump(pipeline, sort_keys=False))
    return SyntheticStore(directory, store_path, directory / "pipeline.yaml", manifests, samples, ids, classes,
                          proto_visual, proto_audio)
