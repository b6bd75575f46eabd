"""Helpers for the training tests: a tiny learnable dataset (store + manifests + pipeline.yaml)
and a tiny linear head registered under a test-only name."""
from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn
from torch.nn import functional as F

from extract.manifest import Sample, write_manifest
from extract.store import STATUS_DONE, core_specs, create_store
from train.heads.base import Head, HeadOutput, segment_loss
from train.heads.layers import pool_over_time
from train.registry import HEADS, register_head

TEST_HEAD = "test-linear"
CLASSES = ["dog", "car", "bell"]


@dataclasses.dataclass
class LinearConfig:
    """Options of the test head."""

    scale: float = 1.0


class LinearTestHead(Head):
    """Per-segment linear classifier on [audio, spatially averaged visual] (tests only)."""

    Config = LinearConfig
    train_defaults = {"lr": 0.05, "batch_size": 8, "epochs": 3}

    def __init__(self, num_classes, setting="supervised", config=None):
        super().__init__(num_classes, setting, config)
        self.fc = nn.Linear(128 + 512, num_classes)

    def forward(self, audio, visual):
        """audio [B, T, 128], visual [B, T, 7, 7, 512] -> scores [B, T, C]."""
        pooled = visual.mean(dim=(2, 3))
        return HeadOutput(self.fc(torch.cat([audio, pooled], dim=-1)) * self.config.scale)

    def loss(self, out, batch, weak_pool="mean"):
        """Supervised: per-segment cross-entropy; weak: NLL of the video class under the softmax
        probabilities pooled over time (``weak_pool``)."""
        if self.setting == "weak":
            pooled = pool_over_time(out.scores.softmax(dim=-1), None, weak_pool)
            return F.nll_loss(torch.log(pooled.clamp_min(1e-8)), batch["video_label"])
        return segment_loss(out.scores, batch["labels"])


@contextlib.contextmanager
def registered_test_head():
    """Register :class:`LinearTestHead` as ``test-linear`` for the duration of the block."""
    cls = type("LinearTestHeadReg", (LinearTestHead,), {"__doc__": LinearTestHead.__doc__})
    register_head(TEST_HEAD)(cls)
    try:
        yield cls
    finally:
        HEADS.pop(TEST_HEAD, None)


def synthetic_features(categories: list[str], spans: list[tuple[int, int]], T: int, rng: np.random.Generator):
    """Features where event segments of class k carry a class pattern (audio dims 8k..8k+7,
    visual channels 16k..16k+15) on top of noise; returns (visual f16, audio f32)."""
    n = len(categories)
    audio = rng.normal(0, 0.5, (n, T, 128)).astype(np.float32)
    visual = rng.normal(0, 0.5, (n, T, 7, 7, 512)).astype(np.float32)
    for i, (cat, (on, off)) in enumerate(zip(categories, spans)):
        if cat:
            k = CLASSES.index(cat)
            audio[i, on:off, 8 * k : 8 * k + 8] += 2.0
            visual[i, on:off, :, :, 16 * k : 16 * k + 16] += 1.0
    return visual.astype(np.float16), audio


def make_samples(split: str, n: int, T: int, rng: np.random.Generator, prefix: str) -> list[Sample]:
    samples = []
    for i in range(n):
        cat = CLASSES[i % len(CLASSES)]
        on = int(rng.integers(0, T // 2))
        off = int(rng.integers(on + 1, T + 1))
        vid = f"{prefix}{i:03d}"
        samples.append(Sample(f"{split}{i:03d}", vid, f"{vid}.mp4", cat, on, off, split))
    return samples


def make_dataset(root: Path, T: int = 10, sizes=(24, 9, 9), seed: int = 0, extra_ids: tuple[str, ...] = ()) -> dict:
    """A store + train/val/test manifests + pipeline.yaml under ``root``.

    Returns {"pipeline": path, "store": path, "manifests": {split: path}, "samples": {split: [...]}}.
    ``extra_ids`` = store rows no manifest uses.
    """
    rng = np.random.default_rng(seed)
    samples = {split: make_samples(split, n, T, rng, f"v{split[:2]}") for split, n in zip(("train", "val", "test"), sizes)}
    manifests = {}
    for split, ss in samples.items():
        manifests[split] = write_manifest(root / "manifests" / f"{split}.csv", ss, CLASSES)
    videos = [s for ss in samples.values() for s in ss]
    ids = [s.key for s in videos] + list(extra_ids)
    cats = [s.category for s in videos] + [""] * len(extra_ids)
    spans = [(s.onset, s.offset) for s in videos] + [(0, 0)] * len(extra_ids)
    visual, audio = synthetic_features(cats, spans, T, rng)
    store_path = root / "store.zarr"
    write_store(store_path, ids, visual, audio, np.ones((len(ids), T), bool), T)
    pipeline = {
        "data": {"splits": {split: {"manifest": f"manifests/{split}.csv"} for split in samples}},
        "store": {"path": "store.zarr"},
        "train": {"runs_root": "runs", "timeline_videos": 2},
    }
    (root / "pipeline.yaml").write_text(yaml.safe_dump(pipeline))
    return {"pipeline": root / "pipeline.yaml", "store": store_path, "manifests": manifests, "samples": samples,
            "visual": visual, "audio": audio, "ids": ids}


def write_store(path: Path, ids, visual, audio, valid, T: int, status=None, rows_per_shard: int = 4):
    store = create_store(path, ids, T, core_specs(T), {"fingerprint": "test", "extractor": {"name": "synthetic"}},
                         rows_per_shard=rows_per_shard, compression_level=1)
    status = np.full(len(ids), STATUS_DONE, np.int8) if status is None else np.asarray(status, np.int8)
    for shard in range(store.num_shards):
        r = store.shard_rows(shard)
        sl = slice(r.start, r.stop)
        store.write_shard(shard, {"visual": visual[sl], "audio": audio[sl], "valid": valid[sl]}, status[sl],
                          ["decode error" if s == 2 else "" for s in status[sl]])
    return store
