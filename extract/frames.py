"""The frame-time rule: which decoded frames stand for a 1-s segment.

A video window of ``T`` segments of ``segment_seconds`` each (AVE: T = 10 one-second segments,
starting at the window start) is sampled with ``F`` frames per segment (AVE: F = 16) at the
**centres of F equal sub-intervals** of each segment::

    time(t, i) = start + t * segment_seconds + (i + 0.5) * segment_seconds / F

for segment t in [0, T) and frame i in [0, F). Every requested time is then served by the decoded
frame whose presentation time (pts, seconds) is **nearest** to it, ties going to the earlier frame.
The rule is the same for every frame rate (19.62, 29.97, 10 fps, variable frame rate): it works on
the presentation times the decoder reports, never on frame counts times a nominal rate.

A requested time is *valid* when it lies within the stream: no later than one frame duration after
the last frame (``time < last_pts + frame_duration``) and no earlier than one frame duration
before the first frame (``time >= first_pts - frame_duration``). Times outside the stream still get
the nearest frame's index (the first or last frame) so arrays stay rectangular, but are marked
invalid so the extractor leaves them out of its segment average.

It also holds :func:`prepare_frames`, the resizing that decode workers apply to the chosen frames.
This module needs numpy (and cv2 inside :func:`prepare_frames`), never torch.
"""
from __future__ import annotations

from typing import Literal

import numpy as np

__all__ = ["prepare_frames", "segment_frame_times", "nearest_frame_indices", "default_frame_duration"]


def segment_frame_times(
    segments: int,
    per_segment: int,
    start: float = 0.0,
    segment_seconds: float = 1.0,
) -> np.ndarray:
    """Requested frame times, [T, F] float64 seconds.

    Frame ``i`` of segment ``t`` is at ``start + t * segment_seconds + (i + 0.5) * segment_seconds / F``
    (with the default 1-s segments: ``start + t + (i + 0.5) / F``).
    """
    if segments < 0 or per_segment < 1:
        raise ValueError(f"segments must be >= 0 and per_segment >= 1, got {segments}, {per_segment}")
    t = np.arange(segments, dtype=np.float64)[:, None]
    i = np.arange(per_segment, dtype=np.float64)[None, :]
    return start + t * segment_seconds + (i + 0.5) * (segment_seconds / per_segment)


def default_frame_duration(pts: np.ndarray) -> float:
    """Median step between consecutive distinct sorted presentation times (0.0 for < 2 frames)."""
    steps = np.diff(np.unique(np.asarray(pts, dtype=np.float64)))
    steps = steps[steps > 0]
    return float(np.median(steps)) if steps.size else 0.0


def nearest_frame_indices(
    pts: np.ndarray,
    times: np.ndarray,
    frame_duration: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Index of the decoded frame nearest to each requested time, and whether the time is covered.

    Args:
        pts: [N] presentation times in seconds, in **decoder order** (may be unsorted, e.g. streams
            with out-of-order timestamps). Duplicated times resolve to the first frame in decoder
            order that has that time.
        times: requested times in seconds, any shape (e.g. [T, F] from :func:`segment_frame_times`).
        frame_duration: seconds one frame is shown; default the median pts step
            (:func:`default_frame_duration`). With fewer than two frames and no duration given the
            duration is 0, so only times up to the single frame's pts are valid; pass 1/fps then.

    Returns:
        ``(index, valid)``, both shaped like ``times``: ``index`` (int64) points into the ORIGINAL
        ``pts`` array (decoder order); ties between two frames equally near go to the earlier
        presentation time. ``valid`` (bool) is true where
        ``first_pts - frame_duration <= time < last_pts + frame_duration``.
        With no frames at all every index is -1 and every time invalid.
    """
    pts = np.asarray(pts, dtype=np.float64).reshape(-1)
    times = np.asarray(times, dtype=np.float64)
    if pts.size == 0:
        return np.full(times.shape, -1, dtype=np.int64), np.zeros(times.shape, dtype=bool)
    if not np.all(np.isfinite(pts)):
        raise ValueError("nearest_frame_indices: pts contains NaN or infinite values")
    if frame_duration is None:
        frame_duration = default_frame_duration(pts)

    order = np.argsort(pts, kind="stable")  # stable: equal pts keep decoder order
    sorted_pts = pts[order]
    flat = times.reshape(-1)

    # candidate frames: the last one at or before t (left) and the first one after it (right)
    right = np.searchsorted(sorted_pts, flat, side="right")
    left = np.clip(right - 1, 0, sorted_pts.size - 1)
    right = np.clip(right, 0, sorted_pts.size - 1)
    dist_left = np.abs(flat - sorted_pts[left])
    dist_right = np.abs(sorted_pts[right] - flat)
    chosen = np.where(dist_left <= dist_right, left, right)  # tie -> earlier frame
    # among frames sharing the chosen pts, take the first in sorted (= decoder) order
    chosen = np.searchsorted(sorted_pts, sorted_pts[chosen], side="left")

    index = order[chosen].reshape(times.shape).astype(np.int64)
    valid = (times >= sorted_pts[0] - frame_duration) & (times < sorted_pts[-1] + frame_duration)
    return index, valid


def prepare_frames(
    frames: np.ndarray,
    image_size: int = 224,
    resize: Literal["squash", "crop"] = "squash",
) -> np.ndarray:
    """uint8 RGB frames [N, H, W, 3] -> uint8 [N, image_size, image_size, 3].

    ``"squash"``: the whole frame resized to image_size x image_size (aspect ratio not kept, as
    the AVE reference fed whole frames to VGG-19). ``"crop"``: the short side resized to
    image_size (long side ``round(long * image_size / short)``), then the centre square cut.
    Interpolation: ``cv2.INTER_AREA`` when the frame shrinks in both directions (anti-aliased),
    else ``cv2.INTER_LINEAR``. Pure numpy + cv2 (picklable, runs in decode worker processes).
    """
    import cv2

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"prepare_frames expects uint8 [N, H, W, 3], got {frames.dtype} {frames.shape}")
    n, h, w, _ = frames.shape
    out = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    if n == 0:
        return out
    if resize == "squash":
        size = (image_size, image_size)  # (width, height) for cv2
    elif resize == "crop":
        scale = image_size / min(h, w)
        size = (max(image_size, int(round(w * scale))), max(image_size, int(round(h * scale))))
    else:
        raise ValueError(f"resize must be 'squash' or 'crop', got {resize!r}")
    shrink = size[0] <= w and size[1] <= h
    interpolation = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    top = (size[1] - image_size) // 2
    left = (size[0] - image_size) // 2
    for k in range(n):
        resized = cv2.resize(np.ascontiguousarray(frames[k]), size, interpolation=interpolation)
        out[k] = resized[top: top + image_size, left: left + image_size]
    return out
