"""Visual outputs of ``avel-predict``: frames, per-second timelines, attention strips, overlay videos.

Plain numpy in, files out; no dependency on the heads or the prediction classes.

- :func:`read_frames` — one RGB frame per requested time, from stage 1's decoder
  (:func:`extract.decode.picture_frames`: the frames the features were computed from), resized
  like the extraction stage resizes frames (:func:`extract.core.frames.prepare_frames`);
- :func:`attention_grid` — [S, k*k] or [S, h, w] attention -> [S, h, w];
- :func:`plot_timeline` — label track (event spans) over the per-second confidence;
- :func:`plot_attention_strip` — one panel per second: the frame with the head's attention map;
- :func:`plot_sol_strip` — one panel per second: the sounding-object map and its Otsu box;
- :func:`strip_pages` — the strips of a long video in pages of :data:`STRIP_SECONDS` seconds;
- :func:`write_overlay_video` — the whole video with the attention overlay and a label track (MP4;
  the painting is drawn here, the encoding is :func:`extract.factories.media.write_painted_video`).

Heat maps: each second's map is upsampled bilinearly to the frame (:func:`train.sol_metrics.resize_map`,
half-pixel centres), min-max normalised per second (:func:`train.sol_metrics.normalize_map`, so the
colour scale is relative to that second: red = the most attended place of that second, blue = the
least) and blended as the jet colour map over the frame.

Media libraries (``decord``, ``av``, ``cv2``) and matplotlib are imported inside the functions:
``train`` must import without them (tests/test_train_imports.py).
"""
from __future__ import annotations

import logging
import math
import zlib
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from extract.factories.media import VideoReadError, even

log = logging.getLogger(__name__)

__all__ = [
    "VideoReadError",
    "read_frames",
    "attention_grid",
    "label_colour",
    "plot_timeline",
    "plot_attention_strip",
    "plot_sol_strip",
    "write_overlay_video",
    "strip_pages",
    "STRIP_SECONDS",
    "MAX_STRIP_PANELS",
    "PANEL_WIDTH_IN",
    "PANEL_HEIGHT_IN",
    "STRIP_TITLE_IN",
]

#: strip panels: inches per panel (width, height incl. its title) and of the figure title; at dpi 100
#: (avel-predict draws a strip per :data:`STRIP_SECONDS` seconds; one figure takes at most
#: :data:`MAX_STRIP_PANELS` panels: 60 rows of 10 are 129 in high, under matplotlib's 2^16 pixels)
STRIP_SECONDS = 60
MAX_STRIP_PANELS = 600
PANEL_WIDTH_IN = 1.9
PANEL_HEIGHT_IN = 2.15
STRIP_TITLE_IN = 0.45
#: the label of seconds without an event (train.data: the last class, "background")
BACKGROUND = "background"
BACKGROUND_COLOUR = (0.82, 0.82, 0.82)
#: overlay video: heat-map opacity
VIDEO_ALPHA = 0.45


# ---------------------------------------------------------------------------------------------
# frames


def read_frames(path: str | Path, times: Sequence[float], size: int = 224, resize: str = "squash") -> np.ndarray:
    """One RGB frame at each requested time, the frame the features were computed from.

    The frames come from stage 1's decoder (:func:`extract.decode.picture_frames`: decord,
    rotation applied, times on decord's timeline, the nearest-pts rule of
    :mod:`extract.core.frames`), so a picture of second ``t`` (``avel-predict`` passes
    ``t + 0.5``) shows the frame a one-frame-per-second grid of the extraction takes for that
    second, also on a file whose stream starts later than 0.

    Args:
        path: a video file.
        times: [N] seconds (any order, repeats allowed).
        size: output side; ``resize``: ``"squash"`` (whole frame to size x size, the extraction's
            default) or ``"crop"`` (short side to size, centre square), see
            :func:`extract.core.frames.prepare_frames`.

    Returns uint8 [N, size, size, 3]; a time beyond the last frame gets the last frame, one before
    the first frame the first. Raises :class:`VideoReadError` (a ValueError) naming the file when
    it is missing, not a video, has no video stream or no decodable frame.
    """
    from extract.decode import DecodeError, picture_frames

    try:
        return picture_frames(str(path), times, size=size, resize=resize)
    except DecodeError as exc:
        raise VideoReadError(str(exc)) from None


# ---------------------------------------------------------------------------------------------
# arrays


def attention_grid(attention: np.ndarray) -> np.ndarray:
    """Per-second attention as maps: [S, k*k] (e.g. [S, 49]) or [S, h, w] (or [S, 1, h, w]) ->
    float32 [S, h, w]. A flat row is read row-major (cell ``i`` at row ``i // k``, column
    ``i % k``), the layout of a [h, w] feature map flattened by ``reshape``/``flatten``."""
    att = np.asarray(attention, dtype=np.float32)
    if att.ndim == 4 and att.shape[1] == 1:
        att = att[:, 0]
    if att.ndim == 3:
        return att.copy()
    if att.ndim == 2:
        k = math.isqrt(att.shape[1])
        if k * k != att.shape[1]:
            raise ValueError(f"attention_grid: {att.shape[1]} cells per second is not a square grid (shape {att.shape})")
        return att.reshape(att.shape[0], k, k).copy()
    raise ValueError(f"attention_grid expects [S, k*k] or [S, h, w], got shape {att.shape}")


def label_colour(label: str, class_names: Sequence[str] | None = None,
                 background: str = BACKGROUND) -> tuple[float, float, float]:
    """RGB (0-1) of a label: light grey for background; else tab20 by the label's index in
    ``class_names`` (by a hash of the name when it is not there), so every plot of a run agrees."""
    from matplotlib import colormaps

    if label == background:
        return BACKGROUND_COLOUR
    names = list(class_names or [])
    index = names.index(label) if label in names else zlib.crc32(str(label).encode())
    r, g, b, _ = colormaps["tab20"](index % 20)
    return (float(r), float(g), float(b))


def _confidence(labels: Sequence[str], probs: np.ndarray, class_names: Sequence[str]) -> np.ndarray:
    """[S] probability of each second's predicted label (the row maximum when the label is not a class)."""
    probs = np.asarray(probs, dtype=np.float64)
    index = {name: i for i, name in enumerate(class_names)}
    return np.array([probs[t, index[lab]] if lab in index else probs[t].max() for t, lab in enumerate(labels)])


def _short(name: str, width: int) -> str:
    return name if len(name) <= width else name[: max(1, width - 1)] + "…"


def _runs(labels: Sequence[str], background: str) -> list[dict[str, Any]]:
    """Maximal runs of equal non-background labels as events (no probabilities)."""
    out: list[dict[str, Any]] = []
    for t, lab in enumerate(labels):
        if lab == background:
            continue
        if out and out[-1]["label"] == lab and out[-1]["offset"] == t:
            out[-1]["offset"] = t + 1
        else:
            out.append({"onset": t, "offset": t + 1, "label": lab})
    return out


# ---------------------------------------------------------------------------------------------
# timeline


def plot_timeline(
    labels: Sequence[str],
    probs: np.ndarray,
    class_names: Sequence[str],
    valid: np.ndarray,
    events: Sequence[Mapping[str, Any]] | None,
    path: str | Path,
    title: str = "",
    background: str = BACKGROUND,
) -> Path:
    """One PNG: the label track over the per-second confidence.

    Args:
        labels: [S] predicted label per second; probs: [S, C] softmax probabilities (columns in
            ``class_names`` order); valid: [S] bool, False where the second had no valid input.
        events: dicts with ``onset``, ``offset`` (seconds, offset exclusive), ``label`` and
            optionally ``mean_probability``; None: the runs of equal non-background labels.

    Top: each event a coloured span (:func:`label_colour`) with its label (and mean
    probability) written on it when the span is wide enough (shortened, or left out, when not);
    seconds outside every event light grey. Bottom: the probability of each second's predicted
    label as a step line in [0, 1]. Invalid seconds are hatched on both. The width grows with S
    (8 in for 10 s, about 18 in for 120 s, at most 20 in). Returns ``path``.
    """
    from matplotlib.patches import Patch, Rectangle
    from matplotlib.ticker import MaxNLocator

    from ..plots import pyplot, save_figure

    plt = pyplot()
    labels = [str(x) for x in labels]
    S = len(labels)
    probs = np.asarray(probs, dtype=np.float64).reshape(S, -1) if S else np.zeros((0, len(class_names)))
    valid = np.ones(S, bool) if valid is None else np.asarray(valid, dtype=bool).reshape(-1)
    if valid.shape[0] != S:
        raise ValueError(f"plot_timeline: {S} labels but {valid.shape[0]} valid flags")
    events = _runs(labels, background) if events is None else [dict(e) for e in events]
    conf = _confidence(labels, probs, class_names) if S else np.zeros(0)

    width = float(np.clip(4.0 + 0.12 * S, 8.0, 20.0))
    fig, (ax_track, ax_conf) = plt.subplots(2, 1, figsize=(width, 3.4), sharex=True,
                                            gridspec_kw={"height_ratios": [1, 2]})
    span = max(S, 1)
    axis_inches = width * 0.86  # the axes' share of the figure width after tight_layout, roughly
    inch_per_second = axis_inches / span
    fontsize = 8

    ax_track.add_patch(Rectangle((0, 0.1), S, 0.8, facecolor=BACKGROUND_COLOUR, edgecolor="none"))
    present: dict[str, tuple[float, float, float]] = {}
    for event in events:
        onset, offset = float(event["onset"]), float(event["offset"])
        label = str(event["label"])
        colour = label_colour(label, class_names, background)
        present.setdefault(label, colour)
        ax_track.add_patch(Rectangle((onset, 0.1), offset - onset, 0.8, facecolor=colour, edgecolor="white", lw=1))
        room = (offset - onset) * inch_per_second - 0.08  # inches available for the text
        chars = int(room / (fontsize * 0.6 / 72))
        mean_p = event.get("mean_probability")
        full = f"{label} ({float(mean_p):.2f})" if mean_p is not None and np.isfinite(float(mean_p)) else label
        text = full if len(full) <= chars else (_short(label, chars) if chars >= 4 else "")
        if text:
            ax_track.text((onset + offset) / 2, 0.5, text, ha="center", va="center", fontsize=fontsize, clip_on=True)
    ax_track.set_ylim(0, 1)
    ax_track.set_yticks([])
    ax_track.set_ylabel("label", rotation=0, ha="right", va="center")

    edges = np.arange(S + 1, dtype=np.float64)
    shown = np.where(valid, conf, np.nan)
    if S:
        ax_conf.step(edges, np.append(shown, shown[-1]), where="post", color="C0", lw=1.5, label="confidence")
        ax_conf.fill_between(edges, np.append(shown, shown[-1]), step="post", color="C0", alpha=0.15)
    for ax in (ax_track, ax_conf):
        for t in np.flatnonzero(~valid):
            ax.axvspan(t, t + 1, facecolor="0.9", edgecolor="0.45", hatch="///", lw=0, zorder=3)
    ax_conf.set_ylim(0, 1.02)
    ax_conf.set_ylabel("p(label)")
    ax_conf.set_xlim(0, span)
    ax_conf.set_xlabel("time (s)")
    ax_conf.grid(alpha=0.3)
    if S <= 30:
        ax_conf.set_xticks(range(0, S + 1))
    else:
        ax_conf.xaxis.set_major_locator(MaxNLocator(nbins=min(24, S), integer=True))
    handles = [Patch(facecolor=c, label=_short(n, 18)) for n, c in list(present.items())[:12]]
    handles.append(Patch(facecolor=BACKGROUND_COLOUR, label=background))
    if (~valid).any():
        handles.append(Patch(facecolor="0.9", edgecolor="0.45", hatch="///", label="no valid input"))
    ax_conf.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.38), ncol=min(len(handles), 7),
                   fontsize=7, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


# ---------------------------------------------------------------------------------------------
# strips of frames


def strip_pages(seconds: int, per_page: int = STRIP_SECONDS) -> list[tuple[int, int]]:
    """The seconds ``[lo, hi)`` of each strip picture of a ``seconds``-long timeline: one page per
    ``per_page`` seconds (the last may be shorter); one page (possibly empty) for short videos."""
    per_page = max(1, int(per_page))
    return [(lo, min(seconds, lo + per_page)) for lo in range(0, max(int(seconds), 1), per_page)]


def _strip_figure(count: int, columns: int, title: str):
    """(plt, fig, axes list of ``count`` axes): ``columns`` panels per row, rest switched off.
    Figure: ``min(columns, count) * PANEL_WIDTH_IN`` wide, ``rows * PANEL_HEIGHT_IN + STRIP_TITLE_IN`` high.
    More than :data:`MAX_STRIP_PANELS` panels is a ValueError (draw pages, :func:`strip_pages`)."""
    from ..plots import pyplot

    if count > MAX_STRIP_PANELS:
        raise ValueError(f"a strip of {count} panels is too large for one figure (at most {MAX_STRIP_PANELS}); "
                         f"draw it in pages of {STRIP_SECONDS} seconds (train.predict.plots.strip_pages)")

    plt = pyplot()
    columns = max(1, min(int(columns), max(count, 1)))
    rows = max(1, math.ceil(count / columns))
    fig = plt.figure(figsize=(columns * PANEL_WIDTH_IN, rows * PANEL_HEIGHT_IN + STRIP_TITLE_IN))
    top = 1.0 - STRIP_TITLE_IN / (rows * PANEL_HEIGHT_IN + STRIP_TITLE_IN)
    grid = fig.add_gridspec(rows, columns, left=0.01, right=0.99, bottom=0.01, top=top, wspace=0.06, hspace=0.25)
    axes = []
    for i in range(rows * columns):
        ax = fig.add_subplot(grid[i // columns, i % columns])
        ax.set_axis_off()
        if i < count:
            axes.append(ax)
    if title:
        fig.suptitle(title, fontsize=11, y=1.0 - 0.12 * STRIP_TITLE_IN / (rows * PANEL_HEIGHT_IN + STRIP_TITLE_IN))
    return plt, fig, axes


def _panel_title(t: int, label: str, confidence: float) -> str:
    conf = f" ({float(confidence):.2f})" if confidence is not None and np.isfinite(float(confidence)) else ""
    return f"t={t} s  {_short(str(label), 16)}{conf}"


def _panel_text(ax, text: str) -> None:
    """A panel's title as plain text above the axes (``set_title`` re-positions every title from
    the axes' tight bounding boxes at draw time: seconds for a 120-panel strip)."""
    ax.text(0.5, 1.02, text, transform=ax.transAxes, ha="center", va="bottom", fontsize=8, clip_on=False)


def _check_strip(frames: np.ndarray, labels: Sequence[str], confidence, name: str) -> tuple[np.ndarray, np.ndarray]:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"{name}: frames must be [S, H, W, 3] uint8, got {frames.shape}")
    S = frames.shape[0]
    conf = np.full(S, np.nan) if confidence is None else np.asarray(confidence, dtype=np.float64).reshape(-1)
    if len(labels) != S or conf.shape[0] != S:
        raise ValueError(f"{name}: {S} frames, {len(labels)} labels, {conf.shape[0]} confidences")
    return frames.astype(np.uint8, copy=False), conf


def plot_attention_strip(
    frames: np.ndarray,
    attention: np.ndarray | None,
    labels: Sequence[str],
    confidence: np.ndarray,
    path: str | Path,
    title: str = "",
    columns: int = 10,
    start: int = 0,
) -> dict[str, Any]:
    """A grid of panels, one per second (``columns`` per row): the frame with the head's attention.

    Args:
        frames: uint8 [S, H, W, 3], one frame per second (:func:`read_frames`).
        attention: [S, h, w] or [S, h*w] (:func:`attention_grid`), or None: the frames only.
        labels: [S] predicted labels; confidence: [S] their probabilities (NaN: not shown).
        start: the second of the first panel (a page of a longer video), for the panel titles.

    Each map is upsampled bilinearly to H x W (:func:`train.sol_metrics.resize_map`), min-max
    normalised per second and drawn as the jet heat map at opacity 0.5 over the frame
    (:func:`train.sol_metrics.heatmap_overlay`). Panel titles: ``"t=3 s  dog (0.87)"``.
    Figure size: :func:`_strip_figure` (saved at dpi 100).

    Returns ``{"path": Path, "maps": float32 [S, H, W] the upsampled maps as drawn, before the
    normalisation and colouring (None without attention), "cells": float32 [S, h, w] the attention
    values used (None without attention)}``.
    """
    from .. import sol_metrics as sol
    from ..plots import save_figure

    frames, conf = _check_strip(frames, labels, confidence, "plot_attention_strip")
    S, H, W = frames.shape[:3]
    cells = maps = None
    if attention is not None:
        cells = attention_grid(attention)
        if cells.shape[0] != S:
            raise ValueError(f"plot_attention_strip: {S} frames but attention for {cells.shape[0]} seconds")
        maps = np.stack([sol.resize_map(c, (H, W)) for c in cells]) if S else np.zeros((0, H, W), np.float32)
    plt, fig, axes = _strip_figure(S, columns, title)
    for t, ax in enumerate(axes):
        image = frames[t] if maps is None else sol.heatmap_overlay(frames[t], sol.normalize_map(maps[t]), alpha=0.5)
        ax.imshow(image, interpolation="nearest")
        _panel_text(ax, _panel_title(start + t, labels[t], conf[t]))
    out = save_figure(fig, path)
    return {"path": out, "maps": maps, "cells": cells}


def plot_sol_strip(
    frames: np.ndarray,
    maps: np.ndarray,
    labels: Sequence[str],
    confidence: np.ndarray,
    path: str | Path,
    title: str = "",
    columns: int = 10,
    floor: float = 0.5,
    start: int = 0,
) -> dict[str, Any]:
    """The sounding-object strip (stm head): per second the normalised map and its Otsu box.

    Args:
        frames: uint8 [S, H, W, 3]; maps: [S, h, w] (or [S, h*w]) sounding-object map per second;
        labels: [S]; confidence: [S]; floor: pre-Otsu floor (:func:`train.sol_metrics.boxes_from_map`);
        start: the second of the first panel (for the titles).

    Each map: resized to H x W (``resize_map``), min-max normalised (``normalize_map``), boxes by
    ``boxes_from_map(norm, floor)``, the box drawn is their ``enclosing_box`` (green), over the jet
    overlay of the normalised map (opacity 0.5). Returns ``{"path": Path, "boxes": float64 [S, 4]
    (x0, y0, x1, y1) in frame pixels, exclusive ends, NaN row where the map gives no box,
    "maps": float32 [S, H, W] the normalised maps drawn}``.
    """
    from matplotlib.patches import Rectangle

    from .. import sol_metrics as sol
    from ..plots import save_figure

    frames, conf = _check_strip(frames, labels, confidence, "plot_sol_strip")
    S, H, W = frames.shape[:3]
    cells = attention_grid(maps)
    if cells.shape[0] != S:
        raise ValueError(f"plot_sol_strip: {S} frames but maps for {cells.shape[0]} seconds")
    norms = np.stack([sol.normalize_map(sol.resize_map(c, (H, W))) for c in cells]) if S else np.zeros((0, H, W), np.float32)
    boxes = np.full((S, 4), np.nan)
    for t in range(S):
        box = sol.enclosing_box(sol.boxes_from_map(norms[t], floor))
        if box is not None:
            boxes[t] = box
    plt, fig, axes = _strip_figure(S, columns, title)
    for t, ax in enumerate(axes):
        ax.imshow(sol.heatmap_overlay(frames[t], norms[t], alpha=0.5), interpolation="nearest")
        if np.isfinite(boxes[t]).all():
            x0, y0, x1, y1 = boxes[t]
            ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor=(0.0, 0.9, 0.0), lw=2))
        _panel_text(ax, _panel_title(start + t, labels[t], conf[t]))
    out = save_figure(fig, path)
    return {"path": out, "boxes": boxes, "maps": norms}


# ---------------------------------------------------------------------------------------------
# overlay video (drawn here, encoded by extract.factories.media)


def _rgb255(colour: tuple[float, float, float]) -> tuple[int, int, int]:
    return (int(colour[0] * 255), int(colour[1] * 255), int(colour[2] * 255))


class _TrackPainter:
    """Draws the label track below a frame: current label text and a bar of the seconds."""

    def __init__(self, width: int, labels: Sequence[str], confidence: np.ndarray, class_names, background: str):
        self.width = width
        self.labels = [str(x) for x in labels]
        self.confidence = np.asarray(confidence, dtype=np.float64).reshape(-1) if confidence is not None else None
        self.scale = float(np.clip(width / 400.0, 0.6, 2.5))
        self.text_h = even(22 * self.scale)
        self.bar_h = even(14 * self.scale)
        self.height = even(self.text_h + self.bar_h + 6 * self.scale)
        S = len(self.labels)
        self.edges = np.rint(np.linspace(0, width, S + 1)).astype(int) if S else np.array([0, width])
        base = np.full((self.height, width, 3), 24, np.uint8)
        y0 = self.text_h
        for t, lab in enumerate(self.labels):
            base[y0:y0 + self.bar_h, self.edges[t]:max(self.edges[t + 1] - 1, self.edges[t] + 1)] = \
                _rgb255(label_colour(lab, class_names, background))
        self.base = base

    def draw(self, seconds: float) -> np.ndarray:
        import cv2

        panel = self.base.copy()
        S = len(self.labels)
        t = int(math.floor(seconds + 1e-9))
        y0, y1 = self.text_h, self.text_h + self.bar_h
        if 0 <= t < S:
            cv2.rectangle(panel, (int(self.edges[t]), y0 - 1), (int(self.edges[t + 1]) - 1, y1), (255, 255, 255),
                          max(1, int(round(self.scale))))
            conf = self.confidence[t] if self.confidence is not None and t < len(self.confidence) else float("nan")
            text = f"{t} s  {self.labels[t]}" + (f"  ({conf:.2f})" if np.isfinite(conf) else "")
        else:
            text = f"{max(t, 0)} s  (no prediction)"
        if S:
            x = int(np.clip(round(seconds / S * self.width), 0, self.width - 1))
            cv2.line(panel, (x, y0 - 2), (x, y1 + 1), (255, 255, 255), 1)
        cv2.putText(panel, text, (int(4 * self.scale), int(self.text_h * 0.72)), cv2.FONT_HERSHEY_SIMPLEX,
                    0.45 * self.scale, (255, 255, 255), 1, cv2.LINE_AA)
        return panel


class _OverlayPainter:
    """``paint(picture, seconds)`` of :func:`extract.factories.media.write_painted_video`: the
    second's attention blended over the picture, the label track below it."""

    def __init__(self, cells: np.ndarray | None, labels: Sequence[str], confidence, class_names, background: str):
        self.cells, self.labels, self.confidence = cells, labels, confidence
        self.class_names, self.background = class_names, background
        self.track: _TrackPainter | None = None
        self.colours: dict[int, np.ndarray] = {}

    def __call__(self, rgb: np.ndarray, seconds: float) -> np.ndarray:
        from .. import sol_metrics as sol

        h, w = rgb.shape[:2]
        if self.track is None:
            self.track = _TrackPainter(w, self.labels, self.confidence, self.class_names, self.background)
        t = int(math.floor(seconds + 1e-9))
        if self.cells is not None and 0 <= t < len(self.labels):
            if t not in self.colours:
                from matplotlib import colormaps

                norm = sol.normalize_map(sol.resize_map(self.cells[t], (h, w)))
                self.colours[t] = colormaps["jet"](norm)[..., :3].astype(np.float32) * 255.0
            blended = rgb.astype(np.float32) * (1.0 - VIDEO_ALPHA) + self.colours[t] * VIDEO_ALPHA
            rgb = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
        return np.concatenate([rgb, self.track.draw(seconds)], axis=0)


def write_overlay_video(
    path: str | Path,
    out_path: str | Path,
    attention: np.ndarray | None,
    labels: Sequence[str],
    confidence: np.ndarray,
    fps: float | None = None,
    size: int | None = 224,
    class_names: Sequence[str] | None = None,
    audio: bool = True,
    background: str = BACKGROUND,
) -> Path:
    """The whole video with the attention overlay and a label track, as an H.264 MP4.

    Args:
        path: the input video; out_path: the MP4 to write (folders created).
        attention: [S, h, w] or [S, h*w] per-second maps, or None (label track only).
        labels: [S] predicted label per second; confidence: [S] their probabilities.
        fps: output frame rate; None: the stream's native (average) rate (frames dropped or
            repeated to reach it, see :func:`extract.factories.media.write_painted_video`).
        size: the output picture's short side in pixels, aspect ratio kept, even dimensions
            (None: the native size); the label track is added BELOW the picture.
        class_names: for the label colours (same as :func:`plot_timeline`'s when given).
        audio: copy the first audio stream unchanged when MP4 can hold its codec (AAC, MP3, ...);
            if that fails the video is rewritten without audio.

    Each decoded frame (rotation applied) of second ``t = floor(time)`` (time from the video
    stream's first frame, as the features count seconds) gets ``attention[t]`` (upsampled
    bilinearly to the picture, min-max normalised per second, jet colours, opacity
    :data:`VIDEO_ALPHA`) when ``t < S``; frames at or after second S get no overlay. The track:
    one cell per second coloured by label (:func:`label_colour`), the current second outlined,
    a play-head line, and the text ``"3 s  dog  (0.87)"``. Encoding (libx264 crf 20, mpeg4 when
    libx264 is absent, yuv420p) is :func:`extract.factories.media.write_painted_video`'s. Returns
    ``out_path``; :class:`VideoReadError` (a ValueError) naming the input when it cannot be
    decoded, :class:`extract.factories.media.EncodeError` when the output cannot be written.
    """
    from extract.factories.media import write_painted_video

    labels = [str(x) for x in labels]
    cells = attention_grid(attention) if attention is not None else None
    if cells is not None and cells.shape[0] != len(labels):
        raise ValueError(f"write_overlay_video: {len(labels)} labels but attention for {cells.shape[0]} seconds")
    painter = _OverlayPainter(cells, labels, confidence, class_names, background)
    return write_painted_video(path, out_path, painter, fps=fps, size=size, audio=audio)
