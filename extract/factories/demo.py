"""The offline demo dataset: a small, deterministic, AVE-like set of real encoded clips.

``avel-extract demo`` writes, with no network and no downloads:

- ``videos/demoNNN.mp4``: 10-s clips (H.264 video, AAC audio, see :func:`extract.factories.media.write_clip`)
  of ``FRAME_SIZE`` pixels at ``FPS`` frames/s with ``SAMPLE_RATE`` Hz mono audio;
- ``manifests/{train,val,test}.csv`` + ``classes.txt`` (the manifest format of
  :mod:`extract.core.manifest`), one sample per video;
- ``segments.csv``: per second of every video, which class cue each modality carries;
- ``boxes/<video_id>/annotations.xml``: for each test clip with an event, the box of the sounding
  object in every frame of its event seconds, in the CVAT 1.1 XML layout of the AVE boxes of the
  STM paper (ground truth of the ``sol`` task), computed from the very geometry the frames are
  drawn with (:func:`sounding_object_boxes`);
- ``pipeline.yaml``: the overrides that point avel at the demo (splits, store, random weights,
  fewer frames per segment, a short training schedule, ``sol.boxes_root``);
- ``README.txt`` and ``demo.json`` (the generation parameters; written last = generation done).

Each of the :data:`CLASSES` is a visual object (a saturated shape with its own colour and motion,
drawn over a muted, noisy, slowly panning texture) and a sound with its own spectral band. As in AVE,
an **event** second is one where the video's class object is visible AND its sound audible (seconds
``onset <= t < offset``); every other second is background, including seconds where only one
modality carries the class cue (object visible but silent, or sound without object) and seconds
with a class-neutral distractor (a grey ellipse and/or a two-tone chime outside every class band).
A per-segment classifier therefore has to combine both modalities.

The cues are coarse on purpose: the demo extracts features with RANDOM VGG-19 / VGGish weights
(pretrained weights cannot be downloaded offline), so the classes differ in colour over large areas
and in where their sound energy lies, which survive random convolutions.

Besides the event clips there are background-only clips (empty category, like AVE's "noisy" videos
that weakly supervised training needs): they show a class object or play a class sound, never both
in the same second.

Everything is a function of ``(videos, background_videos, seed)``: the plan comes from ``numpy`` generators seeded
with ``(seed, video index)``, so the same arguments give byte-identical manifests and identical
decoded media. This module needs numpy; rendering imports cv2 and writing imports PyAV.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from ..core.manifest import Sample, write_manifest

log = logging.getLogger(__name__)

#: seconds per clip = segments per video (AVE: T = 10)
SECONDS = 10
FPS = 10
#: (height, width) of the frames; VGG-19 sees them resized to 224 x 224
FRAME_SIZE = (128, 128)
SAMPLE_RATE = 16000
DEFAULT_VIDEOS = 50
#: background-only clips added to the event clips (category "", no event second), split like them.
#: AVE's weakly supervised training adds 178 such "noisy" videos: with video labels only, they are
#: where a model learns what background looks and sounds like.
DEFAULT_BACKGROUND_VIDEOS = 10
#: guaranteed one-modality seconds of the class cue in a background-only clip (visual, audio)
BACKGROUND_CLIP_ONE_MODALITY = 2
DEFAULT_SEED = 0
#: VGG-19 frames per 1-s segment in the demo config (AVE features: 16; VGG-19 on a CPU is slow)
DEMO_FRAMES_PER_SEGMENT = 1
#: ResNet-152 frames per 1-s segment of the sounding-object maps in the demo config (STM paper: 4).
#: ResNet-152 at its 256 x 256 input costs ~0.56 CPU-seconds a frame (11.5 GFLOP x 1.3): the
#: demo's 60 clips at 1 frame/s are 600 frames, ~3-5 min on 2 cores; 4 frames/s would take 4x as long
DEMO_SOL_FRAMES_PER_SEGMENT = 1
#: folder (in the demo folder) of the sounding-object box files, ``<video_id>/annotations.xml``
BOXES_DIR = "boxes"
#: the split whose event clips get box files (as the STM paper's AVE boxes: the test videos)
BOXES_SPLIT = "test"
#: training epochs and batch size in the demo config
DEMO_EPOCHS = 40
DEMO_BATCH_SIZE = 8
#: split -> share of each class's videos
SPLIT_SHARES = (("train", 0.6), ("val", 0.2), ("test", 0.2))
#: per-second cue of a modality that belongs to no class
DISTRACTOR = "distractor"
#: event length range in seconds (inclusive). AVE's events are long (8.3 s on average, two thirds
#: fill the whole clip); 5-9 s keeps events most of an event clip's seconds, as weakly supervised
#: training assumes, and leaves 1-5 background seconds (the first shows the object without its
#: sound, the second plays the sound without the object)
EVENT_SECONDS = (5, 9)
#: how the non-event seconds are filled beyond the first visual-only and audio-only second
BACKGROUND_ROLES = ("visual_only", "audio_only", "distractor", "empty")
BACKGROUND_WEIGHTS = (0.25, 0.25, 0.3, 0.2)
#: RMS range of a class sound (drawn per clip), RMS of the distractor chime and of the noise floor
SOUND_RMS = (0.08, 0.14)
DISTRACTOR_RMS = 0.08
NOISE_RMS = 0.004
#: fade in/out at the ends of each run of audible seconds (no clicks spilling into other bands)
EDGE_RAMP_SECONDS = 0.01
#: bump when the media change for the same (videos, seed): an existing demo is then regenerated.
#: 3: box files of the sounding object (boxes/) and the sol settings in pipeline.yaml
GENERATOR_VERSION = 3
#: x264 quality of the demo clips (the noisy texture makes lower values slow and large)
CRF = 23
#: encoder delay of FFmpeg's AAC encoder (samples before the signal in the decoded stream)
AAC_PRIMING_SAMPLES = 1024


@dataclasses.dataclass(frozen=True)
class DemoClass:
    """One event class: what is seen and what is heard.

    ``band`` is the frequency range (Hz) holding the sound's energy; the bands of different classes
    do not overlap and the distractor chime lies outside all of them.
    """

    name: str
    shape: str
    colour: tuple[int, int, int]
    motion: str
    sound: str
    band: tuple[float, float]


CLASSES: tuple[DemoClass, ...] = (
    DemoClass("bell", "disc", (225, 35, 35), "bounces left-right", "chord 500/630/750 Hz struck twice a second", (450.0, 800.0)),
    DemoClass("siren", "square", (30, 205, 60), "circles the centre", "tone sweeping 1250-1750 Hz once a second", (1150.0, 1850.0)),
    DemoClass("drum", "triangle", (40, 70, 235), "bobs up and down", "noise band 120-300 Hz beating 4 times a second", (100.0, 320.0)),
    DemoClass("rain", "ring", (245, 220, 30), "pulses in size", "steady noise band 3600-4900 Hz", (3400.0, 5100.0)),
    DemoClass("buzzer", "cross", (220, 40, 220), "spins", "tones 2350/2550/2750 Hz buzzing at 8 Hz", (2200.0, 2900.0)),
)
#: the distractor: a grey ellipse drifting across, and a chime of 950 + 3150 Hz
DISTRACTOR_COLOUR = (185, 185, 185)
DISTRACTOR_TONES = (950.0, 3150.0)


#: the feature stores the demo's commands write into its folder (removed when the demo changes)
DEMO_STORES = ("store.zarr", "sol.zarr")


class DemoError(RuntimeError):
    """The demo cannot be generated (bad arguments, or the output folder holds something else)."""


# ------------------------------------------------------------------------------------------------
# the plan: which cue each modality carries in each second


@dataclasses.dataclass(frozen=True)
class DemoVideo:
    """The plan of one clip. ``visual[t]`` / ``audio[t]``: class name, :data:`DISTRACTOR` or ""."""

    index: int
    video_id: str
    split: str
    category: str
    onset: int
    offset: int
    visual: tuple[str, ...]
    audio: tuple[str, ...]

    @property
    def path(self) -> str:
        return f"{self.video_id}.mp4"

    @property
    def cue_class(self) -> str:
        """The class whose object / sound appears in the clip (its category; for a background-only
        clip the class whose cues appear in one modality at a time)."""
        for cue in self.visual + self.audio:
            if cue and cue != DISTRACTOR:
                return cue
        return self.category

    def label(self, t: int) -> str:
        """The class of second ``t`` ("" = background)."""
        return self.category if self.onset <= t < self.offset else ""

    def sample(self) -> Sample:
        return Sample(
            sample_id=self.video_id, video_id=self.video_id, path=self.path, category=self.category,
            onset=self.onset, offset=self.offset, split=self.split,
        )


def class_by_name(name: str) -> DemoClass:
    for cls in CLASSES:
        if cls.name == name:
            return cls
    raise KeyError(f"{name!r} is not a demo class ({', '.join(c.name for c in CLASSES)})")


def split_counts(videos: int, num_classes: int = len(CLASSES)) -> dict[str, list[int]]:
    """Videos per split per class: each class gets ``videos // K`` (+1 for the first remainder
    classes), divided 60/20/20 with at least one video per class in val and test."""
    minimum = 3 * num_classes
    if videos < minimum:
        raise DemoError(f"--videos must be at least {minimum} (3 per class for train/val/test), got {videos}")
    out: dict[str, list[int]] = {name: [] for name, _ in SPLIT_SHARES}
    for c in range(num_classes):
        n = videos // num_classes + (1 if c < videos % num_classes else 0)
        val = max(1, int(round(n * SPLIT_SHARES[1][1])))
        test = max(1, int(round(n * SPLIT_SHARES[2][1])))
        out["train"].append(n - val - test)
        out["val"].append(val)
        out["test"].append(test)
    return out


def _rng(seed: int, index: int, stream: int) -> np.random.Generator:
    """Independent generator per (seed, video, purpose): 0 = plan, 1 = pixels, 2 = samples."""
    return np.random.default_rng(np.random.SeedSequence([seed, index, stream]))


def plan_timeline(category: str, rng: np.random.Generator) -> tuple[int, int, tuple[str, ...], tuple[str, ...]]:
    """Draw ``(onset, offset, visual, audio)`` for one clip of ``category``.

    The event lasts :data:`EVENT_SECONDS`; of the remaining seconds one (if any) shows the object
    without its sound, one plays the sound without the object, and the others are drawn from
    :data:`BACKGROUND_ROLES`. A distractor second carries the neutral ellipse, chime, or both.
    """
    length = int(rng.integers(EVENT_SECONDS[0], EVENT_SECONDS[1] + 1))
    onset = int(rng.integers(0, SECONDS - length + 1))
    offset = onset + length
    visual = [""] * SECONDS
    audio = [""] * SECONDS
    for t in range(onset, offset):
        visual[t] = audio[t] = category
    rest = [t for t in range(SECONDS) if not onset <= t < offset]
    rest = [rest[i] for i in rng.permutation(len(rest))]
    roles = ["visual_only", "audio_only"][: len(rest)]
    _fill_background(visual, audio, rest, roles, category, rng)
    return onset, offset, tuple(visual), tuple(audio)


def _fill_background(visual: list[str], audio: list[str], seconds: Sequence[int], roles: list[str], cue_class: str,
                     rng: np.random.Generator) -> None:
    """Give ``seconds`` (in order) the ``roles`` given, then roles drawn from
    :data:`BACKGROUND_ROLES`: the class cue in one modality, the distractor (ellipse, chime or
    both), or nothing. Writes into ``visual`` / ``audio``."""
    roles = roles + list(rng.choice(BACKGROUND_ROLES, size=len(seconds) - len(roles), p=BACKGROUND_WEIGHTS))
    for t, role in zip(seconds, roles):
        if role == "visual_only":
            visual[t] = cue_class
        elif role == "audio_only":
            audio[t] = cue_class
        elif role == "distractor":
            which = int(rng.integers(0, 3))  # 0 ellipse, 1 chime, 2 both
            if which in (0, 2):
                visual[t] = DISTRACTOR
            if which in (1, 2):
                audio[t] = DISTRACTOR


def plan_background_timeline(cue_class: str, rng: np.random.Generator) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Draw ``(visual, audio)`` for a background-only clip: no second has both cues of a class.

    :data:`BACKGROUND_CLIP_ONE_MODALITY` seconds show ``cue_class``'s object without its sound, as
    many play its sound without the object; the other seconds are drawn from
    :data:`BACKGROUND_ROLES` as in :func:`plan_timeline`.
    """
    visual = [""] * SECONDS
    audio = [""] * SECONDS
    order = [int(t) for t in rng.permutation(SECONDS)]
    k = BACKGROUND_CLIP_ONE_MODALITY
    _fill_background(visual, audio, order, ["visual_only"] * k + ["audio_only"] * k, cue_class, rng)
    return tuple(visual), tuple(audio)


def background_split_counts(background_videos: int) -> dict[str, int]:
    """Background-only clips per split: 60/20/20 like the event clips (val and test get one each
    as soon as there are at least three)."""
    if background_videos < 0:
        raise DemoError(f"--background-videos must be >= 0, got {background_videos}")
    if background_videos < 3:
        return {"train": background_videos, "val": 0, "test": 0}
    val = max(1, int(round(background_videos * SPLIT_SHARES[1][1])))
    test = max(1, int(round(background_videos * SPLIT_SHARES[2][1])))
    return {"train": background_videos - val - test, "val": val, "test": test}


def plan_demo(
    videos: int = DEFAULT_VIDEOS, seed: int = DEFAULT_SEED, background_videos: int = DEFAULT_BACKGROUND_VIDEOS
) -> list[DemoVideo]:
    """The whole dataset's plan: videos ordered train, val, test; in each split the event clips
    (classes interleaved), then the background-only clips (their cue classes cycling)."""
    counts = split_counts(videos)
    background = background_split_counts(background_videos)
    plan: list[DemoVideo] = []
    for split, _ in SPLIT_SHARES:
        remaining = list(counts[split])
        while any(remaining):
            for c, cls in enumerate(CLASSES):
                if remaining[c] == 0:
                    continue
                remaining[c] -= 1
                index = len(plan)
                onset, offset, visual, audio = plan_timeline(cls.name, _rng(seed, index, 0))
                plan.append(DemoVideo(index, f"demo{index:03d}", split, cls.name, onset, offset, visual, audio))
        for k in range(background[split]):
            index = len(plan)
            cue_class = CLASSES[k % len(CLASSES)].name
            visual, audio = plan_background_timeline(cue_class, _rng(seed, index, 0))
            plan.append(DemoVideo(index, f"demo{index:03d}", split, "", 0, 0, visual, audio))
    return plan


def majority_baseline(plan: Sequence[DemoVideo], split: str = "test") -> tuple[str, float]:
    """Most frequent per-second label of ``split`` ("" = background) and its share of seconds."""
    labels = [v.label(t) for v in plan if v.split == split for t in range(SECONDS)]
    if not labels:
        raise DemoError(f"no {split} videos in the plan")
    names, counts = np.unique(np.asarray(labels, dtype=object).astype(str), return_counts=True)
    best = int(np.argmax(counts))
    return str(names[best]), float(counts[best]) / len(labels)


# ------------------------------------------------------------------------------------------------
# pixels


def _texture(rng: np.random.Generator, height: int, width: int, margin: int) -> np.ndarray:
    """A muted, low-saturation texture [height + 2 margin, width + 2 margin, 3] float32."""
    import cv2

    base = rng.uniform(80, 140)
    tint = rng.uniform(-12, 12, size=3)
    coarse = rng.normal(0.0, 22.0, size=(9, 9, 1)) + rng.normal(0.0, 6.0, size=(9, 9, 3))
    big = cv2.resize(coarse.astype(np.float32), (width + 2 * margin, height + 2 * margin), interpolation=cv2.INTER_CUBIC)
    fine = rng.normal(0.0, 8.0, size=(height + 2 * margin, width + 2 * margin, 3))
    return (base + tint + big + fine).astype(np.float32)


def _shape_mask(cls: DemoClass, yy: np.ndarray, xx: np.ndarray, t: float, phase: float, size: int) -> np.ndarray:
    """Boolean [H, W] mask of ``cls``'s object at time ``t`` seconds (``size`` = min(H, W))."""
    h, w = yy.shape
    cy, cx = h / 2.0, w / 2.0
    if cls.shape == "disc":  # bounces left-right
        cx += 0.2 * w * math.sin(2 * math.pi * 0.5 * t + phase)
        r = 0.27 * size
        return (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
    if cls.shape == "square":  # circles the centre
        a = 2 * math.pi * 0.25 * t + phase
        cy += 0.14 * h * math.sin(a)
        cx += 0.14 * w * math.cos(a)
        s = 0.24 * size
        return (np.abs(yy - cy) < s) & (np.abs(xx - cx) < s)
    if cls.shape == "triangle":  # bobs up and down, apex up
        cy += 0.13 * h * math.sin(2 * math.pi * 1.0 * t + phase)
        half = 0.33 * size
        top, bottom = cy - half, cy + 0.8 * half
        inside_y = (yy >= top) & (yy <= bottom)
        half_width = (yy - top) / (bottom - top) * half * 1.1
        return inside_y & (np.abs(xx - cx) <= half_width)
    if cls.shape == "ring":  # pulses
        r = 0.3 * size * (1.0 + 0.12 * math.sin(2 * math.pi * 1.0 * t + phase))
        d2 = (yy - cy) ** 2 + (xx - cx) ** 2
        return (d2 < r * r) & (d2 > (0.5 * r) ** 2)
    if cls.shape == "cross":  # spins
        a = 2 * math.pi * 0.25 * t + phase
        u = (xx - cx) * math.cos(a) + (yy - cy) * math.sin(a)
        v = -(xx - cx) * math.sin(a) + (yy - cy) * math.cos(a)
        arm, width = 0.36 * size, 0.11 * size
        return ((np.abs(u) < arm) & (np.abs(v) < width)) | ((np.abs(v) < arm) & (np.abs(u) < width))
    raise ValueError(f"unknown demo shape {cls.shape!r}")


def _distractor_mask(yy: np.ndarray, xx: np.ndarray, t: float, phase: float, size: int) -> np.ndarray:
    """A wide grey ellipse drifting diagonally (no class looks like it)."""
    h, w = yy.shape
    cy = h / 2.0 + 0.18 * h * math.sin(2 * math.pi * 0.2 * t + phase)
    cx = w / 2.0 + 0.18 * w * math.cos(2 * math.pi * 0.2 * t + phase)
    ry, rx = 0.16 * size, 0.3 * size
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1.0


@dataclasses.dataclass
class _Scene:
    """What :func:`render_frames` draws a clip from; ``rng`` continues with the per-frame noise."""

    rng: np.random.Generator
    texture: np.ndarray
    colour_jitter: np.ndarray
    phase: float
    distractor_phase: float
    pan: np.ndarray
    margin: int
    yy: np.ndarray
    xx: np.ndarray
    size: int


def _scene(video: DemoVideo, seed: int, fps: int, frame_size: tuple[int, int]) -> _Scene:
    """The clip's drawing parameters, drawn from its pixel generator in a fixed order (texture,
    colour jitter, phases, pan); the same generator then gives the per-frame noise."""
    rng = _rng(seed, video.index, 1)
    height, width = frame_size
    margin = 16
    texture = _texture(rng, height, width, margin)
    colour_jitter = rng.uniform(-12, 12, size=3)
    phase, distractor_phase = rng.uniform(0, 2 * math.pi, size=2)
    pan = rng.uniform(-1, 1, size=2)
    pan = pan / (np.linalg.norm(pan) + 1e-9) * margin / (SECONDS * fps)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    return _Scene(rng, texture, colour_jitter, float(phase), float(distractor_phase), pan, margin, yy, xx,
                  min(height, width))


def render_frames(video: DemoVideo, seed: int, fps: int = FPS, frame_size: tuple[int, int] = FRAME_SIZE) -> np.ndarray:
    """The clip's frames, uint8 RGB [SECONDS * fps, H, W, 3].

    Frame ``k`` shows second ``k // fps``'s visual cue: the class object, the distractor, or
    nothing, over the background texture panning slowly, plus per-frame pixel noise.
    """
    scene = _scene(video, seed, fps, frame_size)
    height, width = frame_size
    frames = np.empty((SECONDS * fps, height, width, 3), dtype=np.uint8)
    for k in range(SECONDS * fps):
        t = k / fps
        oy = int(round(scene.margin + scene.pan[0] * k))
        ox = int(round(scene.margin + scene.pan[1] * k))
        image = scene.texture[oy : oy + height, ox : ox + width].copy()
        cue = video.visual[k // fps]
        if cue == DISTRACTOR:
            image[_distractor_mask(scene.yy, scene.xx, t, scene.distractor_phase, scene.size)] = DISTRACTOR_COLOUR
        elif cue:
            cls = class_by_name(cue)
            image[_shape_mask(cls, scene.yy, scene.xx, t, scene.phase, scene.size)] = (
                np.asarray(cls.colour, np.float32) + scene.colour_jitter)
        image += 5.0 * scene.rng.standard_normal(size=image.shape, dtype=np.float32)
        frames[k] = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return frames


# ------------------------------------------------------------------------------------------------
# boxes of the sounding object (sounding-object localization ground truth)


def sounding_object_boxes(video: DemoVideo, seed: int, fps: int = FPS,
                          frame_size: tuple[int, int] = FRAME_SIZE) -> dict[int, tuple[int, int, int, int]]:
    """``frame number -> (x0, y0, x1, y1)``: the box of the sounding object in each frame of an
    event second (``onset <= k // fps < offset``: the class object is drawn AND its sound plays).

    The box is the bounding rectangle of exactly the pixels :func:`render_frames` paints with the
    class colour in frame ``k`` (the same mask, at the same time ``k / fps``): columns
    ``x0 .. x1 - 1`` and rows ``y0 .. y1 - 1`` (``x1``/``y1`` exclusive, as CVAT's ``xbr``/``ybr``
    are read by ``train.sol_metrics``). Frames of other seconds (object silent, sound without the
    object, background) have no box, as AVE's boxes mark only the sounding object. Frame numbers
    are in decoder order (frame ``k`` is presented at ``k / fps`` seconds)."""
    if not video.category:
        return {}
    scene = _scene(video, seed, fps, frame_size)
    cls = class_by_name(video.category)
    boxes: dict[int, tuple[int, int, int, int]] = {}
    for k in range(SECONDS * fps):
        if video.label(k // fps) != video.category:
            continue
        mask = _shape_mask(cls, scene.yy, scene.xx, k / fps, scene.phase, scene.size)
        rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
        if rows.size == 0:
            continue
        boxes[k] = (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)
    return boxes


def boxes_xml(video: DemoVideo, boxes: dict[int, tuple[int, int, int, int]], fps: int = FPS,
              frame_size: tuple[int, int] = FRAME_SIZE) -> str:
    """CVAT 1.1 "interpolation" XML of one clip, laid out like the AVE sounding-object boxes of
    the STM paper: ``meta/task`` (``size`` = frames, ``original_size``, one label "sounding
    object"), one ``<track>`` whose ``<box>``es are the annotated frames (every one a keyframe,
    ``outside="0"``), plus an ``outside="1"`` box on the frame after each run of annotated frames
    (CVAT's way of ending an interpolation track). Deterministic: no dates."""
    from xml.sax.saxutils import escape, quoteattr

    height, width = frame_size
    frames = SECONDS * fps
    label = "sounding object"
    lines = [
        '<?xml version="1.0" encoding="utf-8"?>',
        "<annotations>",
        "  <version>1.1</version>",
        "  <meta>",
        "    <task>",
        f"      <id>{video.index}</id>",
        f"      <name>{escape(video.video_id)}</name>",
        f"      <size>{frames}</size>",
        "      <mode>interpolation</mode>",
        "      <overlap>0</overlap>",
        "      <start_frame>0</start_frame>",
        f"      <stop_frame>{frames - 1}</stop_frame>",
        "      <labels>",
        "        <label>",
        f"          <name>{label}</name>",
        "          <attributes>",
        "          </attributes>",
        "        </label>",
        "      </labels>",
        "      <original_size>",
        f"        <width>{width}</width>",
        f"        <height>{height}</height>",
        "      </original_size>",
        "    </task>",
        f"    <source>{escape(video.path)}</source>",
        "  </meta>",
    ]
    if boxes:
        lines.append(f'  <track id="0" label={quoteattr(label)} source="manual">')
        previous = None
        for k in sorted(boxes):
            if previous is not None and k != previous + 1:
                lines += _box_lines(previous + 1, boxes[previous], outside=True)
            lines += _box_lines(k, boxes[k], outside=False)
            previous = k
        if previous is not None and previous + 1 < frames:
            lines += _box_lines(previous + 1, boxes[previous], outside=True)
        lines.append("  </track>")
    lines.append("</annotations>")
    return "\n".join(lines) + "\n"


def _box_lines(frame: int, box: tuple[int, int, int, int], outside: bool) -> list[str]:
    x0, y0, x1, y1 = box
    return [
        f'    <box frame="{frame}" outside="{int(outside)}" occluded="0" keyframe="1" '
        f'xtl="{x0:.2f}" ytl="{y0:.2f}" xbr="{x1:.2f}" ybr="{y1:.2f}">',
        "    </box>",
    ]


def boxes_path(out: Path, video: DemoVideo) -> Path:
    """Where the demo writes the box file of ``video``: ``<out>/boxes/<video_id>/annotations.xml``
    (the layout of the AVE boxes, which ``sol.boxes_root`` points at)."""
    return out / BOXES_DIR / video.video_id / "annotations.xml"


def boxed_videos(plan: Sequence[DemoVideo]) -> list[DemoVideo]:
    """The clips that get a box file: the test clips with an event (background-only test clips have
    no sounding-object second, so nothing to annotate)."""
    return [v for v in plan if v.split == BOXES_SPLIT and v.category and v.offset > v.onset]


def write_boxes(out: Path, plan: Sequence[DemoVideo], seed: int) -> int:
    """Write the box file of every clip of :func:`boxed_videos`; returns the number of boxes."""
    count = 0
    for video in boxed_videos(plan):
        boxes = sounding_object_boxes(video, seed)
        path = boxes_path(out, video)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(boxes_xml(video, boxes))
        count += len(boxes)
    return count


# ------------------------------------------------------------------------------------------------
# samples


def band_noise(rng: np.random.Generator, n: int, low: float, high: float, sample_rate: int) -> np.ndarray:
    """White noise band-limited to [low, high] Hz by zeroing FFT bins; unit RMS, [n] float64."""
    spectrum = np.fft.rfft(rng.normal(size=n))
    freqs = np.fft.rfftfreq(n, 1.0 / sample_rate)
    spectrum[(freqs < low) | (freqs > high)] = 0.0
    x = np.fft.irfft(spectrum, n)
    return x / (np.sqrt(np.mean(x * x)) + 1e-12)


def class_sound(cls: DemoClass, rng: np.random.Generator, n: int, sample_rate: int) -> np.ndarray:
    """``cls``'s sound for ``n`` samples, unit RMS, energy inside ``cls.band``."""
    t = np.arange(n) / sample_rate
    phase = rng.uniform(0, 2 * np.pi)
    if cls.name == "bell":  # chord struck at 2 Hz, each strike decaying
        since_strike = np.mod(t + phase / (4 * np.pi), 0.5)  # random strike offset in [0, 0.5) s
        envelope = 0.35 + np.exp(-since_strike / 0.15)
        x = sum(np.sin(2 * np.pi * f * t + k) for k, f in enumerate((500.0, 630.0, 750.0))) * envelope
    elif cls.name == "siren":  # frequency sweeping 1250..1750 Hz at 1 Hz
        inst = 1500.0 + 250.0 * np.sin(2 * np.pi * 1.0 * t + phase)
        x = np.sin(2 * np.pi * np.cumsum(inst) / sample_rate)
    elif cls.name == "drum":  # low noise band, beating 4 times a second
        envelope = 0.3 + np.sin(2 * np.pi * 2.0 * t + phase) ** 2
        x = band_noise(rng, n, 120.0, 300.0, sample_rate) * envelope
    elif cls.name == "rain":  # steady high noise band
        x = band_noise(rng, n, 3600.0, 4900.0, sample_rate)
    elif cls.name == "buzzer":  # three tones, amplitude-modulated at 8 Hz
        envelope = 0.55 + 0.45 * np.sin(2 * np.pi * 8.0 * t + phase)
        x = sum(np.sin(2 * np.pi * f * t) for f in (2350.0, 2550.0, 2750.0)) * envelope
    else:
        raise ValueError(f"no sound for demo class {cls.name!r}")
    return x / (np.sqrt(np.mean(x * x)) + 1e-12)


def distractor_sound(rng: np.random.Generator, n: int, sample_rate: int) -> np.ndarray:
    """Two-tone chime (950 + 3150 Hz, outside every class band) with slow tremolo; unit RMS."""
    t = np.arange(n) / sample_rate
    envelope = 0.6 + 0.4 * np.sin(2 * np.pi * 1.5 * t + rng.uniform(0, 2 * np.pi))
    x = sum(np.sin(2 * np.pi * f * t) for f in DISTRACTOR_TONES) * envelope
    return x / (np.sqrt(np.mean(x * x)) + 1e-12)


def active_runs(active: Sequence[bool]) -> list[tuple[int, int]]:
    """Maximal runs ``[start, end)`` of consecutive true entries."""
    runs: list[tuple[int, int]] = []
    for t, on in enumerate(active):
        if on and runs and runs[-1][1] == t:
            runs[-1] = (runs[-1][0], t + 1)
        elif on:
            runs.append((t, t + 1))
    return runs


def second_gate(active: Sequence[bool], sample_rate: int) -> np.ndarray:
    """[len(active) * sample_rate] gain: 1 in active seconds, 0 elsewhere, with 10-ms linear ramps
    at both ends of each run of active seconds (inside the run, so silent seconds stay silent)."""
    gate = np.zeros(len(active) * sample_rate)
    ramp = max(1, int(EDGE_RAMP_SECONDS * sample_rate))
    for start, end in active_runs(active):
        lo, hi = start * sample_rate, end * sample_rate
        gate[lo:hi] = 1.0
        gate[lo : lo + ramp] = np.arange(ramp) / ramp
        gate[hi - ramp : hi] = np.arange(ramp, 0, -1) / ramp
    return gate


def render_audio(video: DemoVideo, seed: int, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """The clip's mono track, float32 [SECONDS * sample_rate] in [-1, 1]: a faint noise floor, the
    class sound in the seconds whose audio cue is the class, the chime in distractor seconds."""
    rng = _rng(seed, video.index, 2)
    n = SECONDS * sample_rate
    cls = class_by_name(video.cue_class)
    level = rng.uniform(*SOUND_RMS)
    wave = NOISE_RMS * rng.normal(size=n)
    wave += level * class_sound(cls, rng, n, sample_rate) * second_gate([a == cls.name for a in video.audio], sample_rate)
    wave += DISTRACTOR_RMS * distractor_sound(rng, n, sample_rate) * second_gate([a == DISTRACTOR for a in video.audio], sample_rate)
    return np.clip(wave, -1.0, 1.0).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# files


def _params(videos: int, seed: int, background_videos: int = DEFAULT_BACKGROUND_VIDEOS) -> dict:
    return {
        "generator": "avel-extract demo",
        "generator_version": GENERATOR_VERSION,
        "videos": videos,
        "background_videos": background_videos,
        "seed": seed,
        "seconds": SECONDS,
        "fps": FPS,
        "frame_size": list(FRAME_SIZE),
        "sample_rate": SAMPLE_RATE,
        "classes": [c.name for c in CLASSES],
    }


def pipeline_yaml(
    epochs: int = DEMO_EPOCHS, batch_size: int = DEMO_BATCH_SIZE, frames_per_segment: int = DEMO_FRAMES_PER_SEGMENT,
    sol_frames_per_segment: int = DEMO_SOL_FRAMES_PER_SEGMENT,
) -> str:
    """The demo's pipeline.yaml: only what differs from avel's defaults; paths relative to it."""
    splits = "\n".join(
        f"    {name}: {{manifest: manifests/{name}.csv, video_root: videos}}" for name, _ in SPLIT_SHARES
    )
    batch_frames = 2 * frames_per_segment * SECONDS  # two whole videos per VGG-19 forward
    return f"""\
# avel demo pipeline, written by `avel-extract demo`. It overrides only what the demo needs; every
# other key keeps avel's default (see them all with: avel-extract --config THIS_FILE config).
# Relative paths resolve against this file's folder.

data:
  splits:
{splits}

store:
  path: store.zarr

extract:
  # RANDOM network weights: pretrained VGG-19 / VGGish cannot be downloaded offline. This choice is
  # recorded in the store's identity, so these features are never mistaken for real AVE features.
  visual_weights: random
  audio_weights: random
  # DEMO ONLY: {frames_per_segment} VGG-19 frame(s) per 1-s segment instead of AVE's 16, because VGG-19
  # on a CPU runs at a few frames per second. Real AVE features use 16.
  frames_per_segment: {frames_per_segment}
  # VGG-19 forward batches are padded to batch_frames; two videos' frames per batch wastes nothing here
  batch_frames: {batch_frames}
  # Sounding-object maps (extractors resnet152_maps + vggish_maps, task sol): RANDOM ResNet-152 too,
  # and DEMO ONLY {sol_frames_per_segment} ResNet-152 frame(s) per 1-s segment instead of the STM paper's 4, because
  # ResNet-152 at 256 x 256 takes about half a CPU-second per frame.
  sol_visual_weights: random
  sol_frames_per_segment: {sol_frames_per_segment}

train:
  runs_root: runs
  # DEMO ONLY: a short schedule with small batches for the few demo videos (the heads' paper
  # schedules run e.g. 300 epochs of batch 64 over AVE's 3339 training videos)
  epochs: {epochs}
  batch_size: {batch_size}

sol:
  # ground truth of the sounding-object task: the box of the sounding object in every frame of the
  # event seconds of each test clip with an event (CVAT XML, <video_id>/annotations.xml)
  boxes_root: {BOXES_DIR}
  # evaluate on the demo frames' own size ({FRAME_SIZE[1]} x {FRAME_SIZE[0]}; AVE: 256 x 256)
  eval_size: {FRAME_SIZE[0]}

heads:
  # DEMO ONLY: every head with a `loss` option (the Tian et al. family) trains with cross-entropy
  # on the logits instead of the reference MultiLabelSoftMargin-on-softmax loss, which learns too
  # slowly for a schedule of a few hundred steps (it stays at the majority class here; on an
  # AVE-sized store it needs several epochs). Remove this to train with the papers' loss.
  "*": {{loss: ce}}
"""


def readme_text(plan: Sequence[DemoVideo], videos: int, seed: int, background_videos: int = DEFAULT_BACKGROUND_VIDEOS,
                boxes: int = 0) -> str:
    boxed = len(boxed_videos(plan))
    counts = {name: sum(v.split == name for v in plan) for name, _ in SPLIT_SHARES}
    empty = {name: sum(v.split == name and not v.category for v in plan) for name, _ in SPLIT_SHARES}
    label, share = majority_baseline(plan, "test")
    classes = "\n".join(
        f"  {i}  {c.name:7s} {c.shape} {c.colour} that {c.motion}; sound: {c.sound}" for i, c in enumerate(CLASSES)
    )
    return f"""\
avel demo dataset (generated offline by `avel-extract demo --videos {videos} --background-videos {background_videos} --seed {seed}`)

{len(plan)} clips of {SECONDS} s: H.264 video {FRAME_SIZE[1]}x{FRAME_SIZE[0]} at {FPS} fps, AAC mono audio at
{SAMPLE_RATE} Hz. Splits: {counts['train']} train / {counts['val']} val / {counts['test']} test videos. An event video has one
event class; {empty['train']} / {empty['val']} / {empty['test']} of them are background-only videos (empty category, no event second,
like AVE's "noisy" videos: they show a class object or play a class sound, never both at once).

Classes (index = line of manifests/classes.txt; background = {len(CLASSES)}):
{classes}

An EVENT second (onset <= t < offset in the manifest) shows the video's class object AND plays its
sound. Every other second is background: some show the object but are silent, some play the sound
with no object, some hold a neutral distractor (a grey ellipse and/or a {DISTRACTOR_TONES[0]:g} + {DISTRACTOR_TONES[1]:g} Hz
chime), some only the textured background and a faint noise floor. A model must combine both
modalities to find the events. segments.csv lists, per second, the cue each modality carries.

Majority-class baseline on the test seconds: {share:.3f} ({label or 'background'}).

Sounding-object boxes: boxes/<video_id>/annotations.xml (CVAT 1.1 XML, the layout of the AVE
boxes) for the {boxed} test clips with an event: in every frame of an event second, the bounding
box of the pixels painted with the class object's colour ({boxes} boxes). Frames outside the events
have none: there the object is absent or silent.

Files: videos/ (the clips), manifests/ (train/val/test.csv + classes.txt), segments.csv, boxes/,
pipeline.yaml (random VGG-19/VGGish/ResNet-152 weights, {DEMO_FRAMES_PER_SEGMENT} VGG-19 frame per segment instead of 16
and {DEMO_SOL_FRAMES_PER_SEGMENT} ResNet-152 frame instead of 4, a short training schedule, cross-entropy loss for the
Tian et al. heads, sol.boxes_root), demo.json (generation parameters).
The feature stores (store.zarr, sol.zarr) and the training runs (runs/) appear here once made:
  avel-extract --config {{this folder}}/pipeline.yaml --split all
  avel-train --config {{this folder}}/pipeline.yaml --head dmrn
and for sounding-object localization (the STM head on ResNet-152 / VGGish maps):
  avel-extract --config {{this folder}}/pipeline.yaml --split all --set 'extract.extractors=[resnet152_maps,vggish_maps]' --set store.path=sol.zarr
  avel-train --config {{this folder}}/pipeline.yaml --task sol --head stm --set store.path=sol.zarr
"""


def segments_csv(plan: Sequence[DemoVideo]) -> str:
    """``video_id,second,visual,audio,label`` for every second of every video."""
    lines = ["video_id,second,visual,audio,label"]
    for v in plan:
        for t in range(SECONDS):
            lines.append(f"{v.video_id},{t},{v.visual[t]},{v.audio[t]},{v.label(t)}")
    return "\n".join(lines) + "\n"


def read_segments(path: str | Path) -> dict[str, list[dict[str, str]]]:
    """``segments.csv`` as ``{video_id: [row per second]}`` (rows: second, visual, audio, label)."""
    import csv

    out: dict[str, list[dict[str, str]]] = {}
    with Path(path).open(newline="") as fh:
        for row in csv.DictReader(fh):
            out.setdefault(row["video_id"], []).append(row)
    return out


def compensate_priming(audio: np.ndarray, priming: int = AAC_PRIMING_SAMPLES) -> np.ndarray:
    """Shift a track so that, once encoded, its DECODED samples line up with the seconds.

    The AAC encoder puts ``priming`` samples of encoder delay before the signal and the MP4 that
    :func:`extract.factories.media.write_clip` writes carries no edit list, so decoders (decord, PyAV) return
    them as the first samples of the stream. Feeding ``audio[priming:]`` (plus ``priming`` zeros at
    the end, so the stream still covers every second) makes decoded sample k = ``audio[k]`` for
    ``k >= priming``; the first ``priming`` samples (64 ms at 16 kHz) are the encoder's near-silence.
    """
    audio = np.asarray(audio, dtype=np.float32)
    return np.concatenate([audio[priming:], np.zeros(priming, dtype=np.float32)])


def write_video(video: DemoVideo, folder: Path, seed: int) -> Path:
    """Render and encode one clip to ``folder/<video_id>.mp4`` (via a temporary file, so an
    interrupted run never leaves a truncated clip under the final name)."""
    from .media import write_clip

    final = folder / video.path
    partial = folder / f".{video.video_id}.partial.mp4"
    audio = compensate_priming(render_audio(video, seed))
    write_clip(partial, render_frames(video, seed), fps=FPS, audio=audio, sample_rate=SAMPLE_RATE, crf=CRF)
    os.replace(partial, final)
    return final


def write_metadata(out: Path, plan: Sequence[DemoVideo], videos: int, seed: int, background_videos: int = DEFAULT_BACKGROUND_VIDEOS) -> None:
    """Write everything but the clips: manifests + classes.txt, segments.csv, the box files,
    pipeline.yaml, README.txt."""
    classes = [c.name for c in CLASSES]
    for split, _ in SPLIT_SHARES:
        write_manifest(out / "manifests" / f"{split}.csv", [v.sample() for v in plan if v.split == split], classes)
    (out / "segments.csv").write_text(segments_csv(plan))
    boxes_root = out / BOXES_DIR
    if boxes_root.is_dir():  # box files of another demo would be read as ground truth
        shutil.rmtree(boxes_root)
    boxes = write_boxes(out, plan, seed)
    (out / "pipeline.yaml").write_text(pipeline_yaml())
    (out / "README.txt").write_text(readme_text(plan, videos, seed, background_videos, boxes))


@dataclasses.dataclass
class DemoSummary:
    """What :func:`generate_demo` made (or found already made)."""

    out: Path
    plan: list[DemoVideo]
    reused: bool
    seconds: float
    baseline_label: str
    baseline_accuracy: float

    @property
    def pipeline(self) -> Path:
        return self.out / "pipeline.yaml"

    def split_sizes(self) -> dict[str, int]:
        return {name: sum(v.split == name for v in self.plan) for name, _ in SPLIT_SHARES}


def _demo_files(out: Path, plan: Sequence[DemoVideo]) -> list[Path]:
    """Every file a finished demo has (videos, manifests, metadata)."""
    names = [f"manifests/{split}.csv" for split, _ in SPLIT_SHARES]
    names += ["manifests/classes.txt", "segments.csv", "pipeline.yaml", "README.txt", "demo.json"]
    return ([out / "videos" / v.path for v in plan] + [boxes_path(out, v) for v in boxed_videos(plan)]
            + [out / name for name in names])


def _check_out_folder(out: Path, plan: Sequence[DemoVideo], params: dict, force: bool) -> bool:
    """True when ``out`` already holds this exact demo, complete. Raise when it holds something else.

    A folder holding a demo made with other parameters loses its feature stores (``store.zarr``,
    ``sol.zarr``), whose rows no longer match the clips."""
    marker = out / "demo.json"
    if marker.is_file():
        try:
            old = json.loads(marker.read_text())
        except ValueError:
            old = None
        if old == params:
            return not force and all(path.is_file() for path in _demo_files(out, plan))
        for store in (out / name for name in DEMO_STORES):
            if store.exists():
                log.info("%s was made from another demo; removing it", store)
                shutil.rmtree(store)
        return False
    if out.is_dir() and any(out.iterdir()) and not force:
        raise DemoError(
            f"{out} exists and is not an avel demo folder (no demo.json); choose another --out, "
            f"empty it, or pass --force to write the demo files into it anyway"
        )
    return False


def generate_demo(
    out: str | Path = "data/demo",
    videos: int = DEFAULT_VIDEOS,
    seed: int = DEFAULT_SEED,
    *,
    background_videos: int = DEFAULT_BACKGROUND_VIDEOS,
    force: bool = False,
    progress: bool = False,
) -> DemoSummary:
    """Generate the demo dataset into ``out`` (see the module docstring for the files).

    Idempotent: when ``out/demo.json`` records the same parameters and every file is there, nothing
    is written (``force`` regenerates). A demo made with other parameters is replaced and its
    feature store removed.
    """
    out = Path(out)
    params = _params(videos, seed, background_videos)
    plan = plan_demo(videos, seed, background_videos)
    label, share = majority_baseline(plan, "test")
    started = time.perf_counter()
    if _check_out_folder(out, plan, params, force):
        log.info("%s already holds this demo (demo.json matches); reusing it", out)
        return DemoSummary(out, plan, True, 0.0, label, share)
    video_dir = out / "videos"
    video_dir.mkdir(parents=True, exist_ok=True)
    (out / "demo.json").unlink(missing_ok=True)
    wanted = {v.path for v in plan}
    for stale in video_dir.glob("demo*.mp4"):
        if stale.name not in wanted:
            stale.unlink()
    items = plan
    if progress:
        from tqdm import tqdm

        items = tqdm(plan, desc="demo videos", unit="video")
    for video in items:
        write_video(video, video_dir, seed)
    write_metadata(out, plan, videos, seed, background_videos)
    (out / "demo.json").write_text(json.dumps(params, indent=2) + "\n")
    elapsed = time.perf_counter() - started
    log.info("wrote %d demo videos to %s in %.1f s", len(plan), out, elapsed)
    return DemoSummary(out, plan, False, elapsed, label, share)


def next_commands(pipeline: str | Path) -> list[str]:
    """The commands that extract the demo's features and train/evaluate a head on them: the AVE
    features + a DMRN head, then the sounding-object maps (their own store, ``sol.zarr`` beside
    pipeline.yaml: relative store paths resolve against its folder) + the STM head."""
    return [
        f"avel-extract --config {pipeline} --split all",
        f"avel-train --config {pipeline} --head dmrn",
        f"avel-extract --config {pipeline} --split all --set 'extract.extractors=[resnet152_maps,vggish_maps]' "
        f"--set store.path=sol.zarr",
        f"avel-train --config {pipeline} --task sol --head stm --set store.path=sol.zarr",
    ]
