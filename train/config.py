"""Defaults of the training stage (sections ``train`` and ``heads`` of pipeline.yaml)."""
from __future__ import annotations

import dataclasses
from typing import Any, Literal

from extract.core.settings import register_section, section


@section("train")
@dataclasses.dataclass
class TrainConfig:
    """How a head is trained and evaluated. ``null`` optimiser fields take the head's own
    defaults (the paper's schedule), see ``Head.train_defaults``."""

    #: "avel" (event localization), "cml" (cross-modality localization), "sol" (sounding objects)
    task: str = "avel"
    #: head name(s) from the registry (`avel-train --list-heads`)
    head: str = "dmrn"
    #: "supervised" (segment labels) or "weak" (video labels only, evaluated per segment)
    setting: Literal["supervised", "weak"] = "supervised"
    #: split names from data.splits
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    #: which split picks the epoch whose weights are evaluated; "test" only to compare with papers
    select_on: Literal["val", "test", "last"] = "val"
    #: a new random order of the training split every epoch; false = the manifest's order every epoch
    shuffle: bool = True
    #: "avel": order, evaluation and selection as set in this section; "reference": those of the head's
    #: reference training script (batch order, last partial batch, selection split and evaluation epochs,
    #: see docs/training.md), replacing shuffle, select_on and eval_every; outputs say "reference protocol"
    protocol: Literal["avel", "reference"] = "avel"
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0])
    #: null = head default
    epochs: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    weight_decay: float | None = None
    #: multiply lr by lr_gamma every lr_step epochs (null = head default / no decay)
    lr_step: int | None = None
    #: or multiply lr by lr_gamma after each of these epochs (MultiStepLR; null = head default,
    #: [] = none); a config value of lr_step or milestones wins over the head's default of the other
    milestones: list[int] | None = None
    lr_gamma: float | None = None
    #: clip the global gradient L2 norm to this before each step (null = head default, 0 = off)
    grad_clip: float | None = None
    #: evaluate on the selection split every N epochs
    eval_every: int = 1
    #: weak-supervision MIL pooling over time: "mean" (paper eq. 7) or "max" (reference code)
    weak_pool: Literal["mean", "max"] = "mean"
    device: str = "auto"
    #: torch CPU threads (torch.set_num_threads); null or 0 = every core (os.cpu_count()).
    #: `avel-train --threads N`; the run's config.yaml records the number used
    threads: int | None = None
    #: run directories go to runs_root/<task>-<head>-<setting>/seed<k>-<time>
    runs_root: str = "data/runs"
    #: number of test videos drawn in the timeline plot
    timeline_videos: int = 6
    #: samples whose store row is not "done" (missing/failed): false = refuse to train (the error
    #: lists them), true = leave them out with a warning that counts them
    skip_incomplete: bool = False


#: per-head overrides of each head's own ``Config`` dataclass: ``heads: {dmrn: {hidden: 64}}``;
#: validated against that dataclass when the head is built
HEAD_OVERRIDES = register_section("heads", dict[str, dict[str, Any]])


@section("sol")
@dataclasses.dataclass
class SolConfig:
    """Sounding-object localization (task ``sol``, STM head): ground truth and evaluation.
    The store (``store.path`` / ``--store``) must hold ``frame_maps``, ``frame_index`` and
    ``audio_maps`` (extractors ``resnet152_maps`` and ``vggish_maps``)."""

    #: folder of CVAT box files, ``<video_id>/annotations.xml`` (the STM paper's AVE test boxes)
    boxes_root: str = "data/boxes/ave"
    #: evaluation frame: maps and boxes are compared on eval_size x eval_size (paper: 256); 0 = original size
    eval_size: int = 256
    #: cIoU map threshold tau on the min-max normalised map (paper: 0.5)
    map_threshold: float = 0.5
    #: map values below this are zeroed before Otsu (authors' find_bbox_in_heatmap: 0.5; 0 = off)
    otsu_floor: float = 0.5
    #: a frame counts as localized when its cIoU / IoU is at least this (cIoU@0.5, IoU@0.5)
    success_threshold: float = 0.5
    #: videos per forward pass when evaluating whole videos
    eval_batch: int = 8
    #: every test video needs a box file under boxes_root (checked before training); true = score
    #: only the test videos that have one (the others are counted in a warning)
    allow_missing_boxes: bool = False
