"""Helpers for the training tests: a tiny learnable dataset (store + manifests + pipeline.yaml)
and a tiny linear head registered under a test-only name."""
from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from extract.core.store import open_store
from extract.factories.synthetic import make_synthetic, write_rows
from train.heads.base import Head, HeadOutput, segment_loss
from train.heads.layers import pool_over_time
from train.registry import HEADS, register_head

TEST_HEAD = "test-linear"
CLASSES = ["dog", "car", "bell"]
#: store attributes of the test stores
STORE_ATTRS = {"fingerprint": "test", "extractor": {"name": "synthetic"}}


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


def make_dataset(root: Path, T: int = 10, sizes=(24, 9, 9), seed: int = 0, extra_ids: tuple[str, ...] = ()) -> dict:
    """A store + train/val/test manifests + pipeline.yaml under ``root``, written by
    :func:`extract.factories.synthetic.make_synthetic` (classes :data:`CLASSES` in turn, a prototype per
    class on each event window, noise 0.5, 4 rows per shard).

    Returns {"pipeline": path, "store": path, "manifests": {split: path}, "samples": {split: [...]},
    "visual", "audio": the store's arrays, "ids": its row ids}. ``extra_ids`` = store rows no manifest uses.
    """
    written = make_synthetic(root, splits=dict(zip(("train", "val", "test"), sizes)), classes=CLASSES, segments=T,
                             extra_ids=extra_ids, seed=seed, noise=0.5, balanced=True, rows_per_shard=4, id_prefix="v", attrs=STORE_ATTRS,
                             pipeline_sections={"train": {"runs_root": "runs", "timeline_videos": 2}})
    store = open_store(written.store)
    return {"pipeline": written.pipeline, "store": written.store, "manifests": written.manifests,
            "samples": written.samples, "visual": store.read("visual"), "audio": store.read("audio"), "ids": written.ids}


def write_store(path: Path, ids, visual, audio, valid, T: int, status=None, rows_per_shard: int = 4):
    """A store of the given arrays (``status`` per row, default all done)."""
    return write_rows(path, ids, T, {"visual": visual, "audio": audio, "valid": valid}, status=status,
                      attrs=STORE_ATTRS, rows_per_shard=rows_per_shard)
