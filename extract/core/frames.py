"""The frame-time rules: which decoded frames stand for a 1-s segment.

Two rules, chosen by ``extract.frame_rule`` (:mod:`extract.config`; the ``ave2018`` recipe sets
``index``):

**pts** (avel's own). A video window of ``T`` segments of ``segment_seconds`` each (AVE: T = 10
one-second segments, starting at the window start) is sampled with ``F`` frames per segment (AVE:
F = 16) at the **centres of F equal sub-intervals** of each segment::

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

**index** (the AVE reference's, Tian et al. 2018, ``video_frame_sample`` of the feature extraction
scripts; see :func:`reference_frame_indices`). The reference read every frame of a video through
imageio, i.e. ffmpeg converting the stream to a **constant frame rate** (``rgb24``, image2pipe:
ffmpeg's ``-vsync cfr``), and with ``n`` frames per ``T``-second video took::

    interval = int(n / T);   frame(l, i) = int(l * interval + (i / F) * interval)

for segment ``l`` and sample ``i``. avel reproduces the constant-rate frame list from the
decoder's own frames and timestamps (:func:`cfr_output_frames`, ffmpeg's frame-rate conversion,
checked against the ffmpeg binary in tests/test_ave2018.py): for a constant-rate file it is simply
every decoded frame once; for a variable-rate file frames are duplicated or dropped exactly where
ffmpeg duplicates or drops them. :func:`index_rule_plan` applies the formula to the frames of a
window (see there for windows that do not start at 0 or that the video does not fill).

It also holds :func:`prepare_frames`, the resizing that decode workers apply to the chosen frames.
This module needs numpy (and cv2 inside :func:`prepare_frames`), never torch.
"""
from __future__ import annotations

from typing import Literal

import numpy as np

__all__ = ["prepare_frames", "segment_frame_times", "nearest_frame_indices", "default_frame_duration",
           "reference_frame_indices", "cfr_output_frames", "index_rule_plan", "FRAME_RULES", "INTERPOLATIONS"]

#: ``extract.frame_rule`` values: avel's nearest-pts rule, the AVE reference's frame-count rule
FRAME_RULES = ("pts", "index")
#: ``extract.interpolation`` values of :func:`prepare_frames`
INTERPOLATIONS = ("auto", "linear")


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



# ------------------------------------------------------------------------------------------
# the AVE reference's frame-count rule ("index")


def reference_frame_indices(n: int, segments: int, per_segment: int, interval: int | None = None
                            ) -> tuple[np.ndarray, np.ndarray]:
    """The AVE reference's frame numbers for ``n`` frames, [T, F] int64, and whether they exist.

    ``interval = int(n / T)`` (or the given ``interval``); frame ``(l, i)`` is
    ``int(l * interval + (i * 1.0 / F) * interval)``, evaluated in float64 in the reference's
    order of operations, so the numbers are the reference's bit for bit. ``valid`` is
    ``index < n`` (always true with the default interval, unless ``n == 0``).
    """
    if segments < 1 or per_segment < 1:
        raise ValueError(f"segments and per_segment must be >= 1, got {segments}, {per_segment}")
    n = int(n)
    interval = n // segments if interval is None else int(interval)
    l = np.arange(segments, dtype=np.float64)[:, None]
    i = np.arange(per_segment, dtype=np.float64)[None, :]
    index = np.floor(l * interval + (i * 1.0 / per_segment) * interval).astype(np.int64)
    return index, index < n


def cfr_output_frames(pts: np.ndarray, rate: float, durations: np.ndarray | None = None, offset: float = 0.0,
                      single_stream: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The frames ffmpeg's constant-frame-rate conversion outputs: which decoded frame each shows.

    What imageio's reader (``ffmpeg -i FILE -f image2pipe -pix_fmt rgb24 -vcodec rawvideo -``)
    delivered to the AVE reference: the stream converted to ``rate`` frames per second (ffmpeg's
    guessed frame rate of the stream, :attr:`av.video.stream.VideoStream.guessed_rate`) by
    ffmpeg's ``-vsync cfr`` logic (fftools ``video_sync_process``): each decoded frame, in
    presentation order, is emitted 0 (dropped), 1 or several (duplicated) times according to how
    far its timestamp has drifted from the next output slot, with ffmpeg's thresholds (drop below
    -1.1 frames, duplicate above 1.1, previous frame repeated into a gap, the last frame repeated
    at the end as the median of the last three repeat counts). A file with one stream only uses
    the ``vscfr`` variant (the first frame's time is the first output slot instead of duplicating
    it back to time 0).

    Args:
        pts: [N] presentation times of the decoded frames in seconds (decoder order), relative to
            the video stream's start.
        rate: output frames per second.
        durations: [N] display durations in seconds (the packets' durations) in **presentation
            order** (sorted by time, whatever the decoder order of ``pts``); default: the step to
            the next frame, the median step for the last one. A duration of 0 counts as 1/rate.
        offset: seconds from the container's start to the video stream's start (ffmpeg measures
            output time from the container's start: an audio stream that starts earlier makes
            ffmpeg duplicate the first frame until the video starts).
        single_stream: the container has no other stream (``vscfr``).

    Returns:
        ``(source, slot)``: [K] int64, for each output frame in order the index into ``pts`` of
        the decoded frame it shows, and its output frame number (time ``slot / rate`` seconds from
        the container's start). For a constant-rate stream ``source`` is every frame once, in
        presentation order.
    """
    pts = np.asarray(pts, dtype=np.float64).reshape(-1)
    if pts.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if not rate > 0:
        raise ValueError(f"cfr_output_frames: the output rate must be positive, got {rate}")
    order = np.argsort(pts, kind="stable")
    if durations is None:
        steps = np.diff(pts[order])
        positive = steps[steps > 0]
        last = float(np.median(positive)) if positive.size else 1.0 / rate
        span = np.append(steps, last)
    else:
        span = np.asarray(durations, dtype=np.float64).reshape(-1)
        if span.size != pts.size:
            raise ValueError(f"cfr_output_frames: {span.size} durations for {pts.size} frames")
    source: list[int] = []
    slot: list[int] = []
    next_slot, history, previous = 0, [0, 0, 0], None
    for src, seconds in zip(order.tolist(), span.tolist()):
        x = (pts[src] + offset) * rate  # the frame's time in output frames
        if x != np.rint(x):  # ffmpeg nudges non-integral times off exact midpoints by 2^-17 frames
            x += np.sign(x) * 2.0 ** -17
        duration = seconds * rate if seconds > 0 else 1.0
        drift = x - next_slot
        delta = drift + duration
        repeat_previous, count = 0, 1
        if drift < 0 < delta:  # the frame started before its slot: clip it
            duration += drift
            x, drift = float(next_slot), 0.0
        if single_stream and not slot and drift >= 0.5:  # vscfr: no duplicated initial frames
            delta, drift = duration, 0.0
            next_slot = int(np.rint(x))
        if delta < -1.1:
            count = 0
        elif delta > 1.1:
            count = int(np.rint(delta))
            if drift > 1.1:
                repeat_previous = int(np.rint(drift - 0.6))
        history = [repeat_previous] + history[:2]
        for k in range(count):
            source.append(previous if (k < repeat_previous and previous is not None) else src)
            slot.append(next_slot)
            next_slot += 1
        previous = src
    for _ in range(sorted(history)[1]):  # end of stream: the last frame repeated (median of the last three)
        source.append(previous)
        slot.append(next_slot)
        next_slot += 1
    return np.asarray(source, np.int64), np.asarray(slot, np.int64)


def index_rule_plan(times: np.ndarray, segments: int, per_segment: int, rate: float, start: float = 0.0,
                    duration: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The reference's frame-count rule on a video window: positions [T, F] into ``times`` and validity.

    ``times`` [K] are the (increasing) times in seconds of the constant-rate frames
    (:func:`cfr_output_frames`: ``slot / rate``); ``rate`` their frames per second. The window's
    frames are those with ``start <= time < start + min(duration, T)``, or with ``duration`` None
    (a manifest row without a window, as AVE's) every frame from ``start`` to the end of the video,
    as the reference read whole videos. Of these ``n`` frames:

    - when they fill T seconds to within half a second (``n >= round(T * rate - rate / 2)``):
      ``interval = int(n / T)``, the reference's formula on them (a window in the middle of a long
      video too). Without ``duration`` a video longer than T seconds is stretched onto the T
      segments, as the reference did (AVE's videos are 10 s; give manifest rows a ``duration`` to
      cut longer videos into one-second segments);
    - otherwise (a video shorter than T - 0.5 s, the last, partial window of a long video, a
      ``duration`` shorter than T): the interval of a full window at this rate,
      ``int(round(T * rate) / T)``, so seconds keep their length; samples past the last frame are
      invalid (their segments are left out, as with the pts rule). The reference squeezed such
      videos onto the T segments, out of step with the audio seconds.

    Frame ``(l, i)`` is the window's frame number :func:`reference_frame_indices` (l, i).
    """
    times = np.asarray(times, dtype=np.float64).reshape(-1)
    tolerance = 1e-6  # output times are k / rate in float; a frame exactly at a bound belongs to the window
    first = int(np.searchsorted(times, start - tolerance, side="left"))
    if duration is None:
        last = times.size
    else:
        last = int(np.searchsorted(times, start + min(float(duration), float(segments)) - tolerance, side="left"))
    n = max(0, last - first)
    full = round(segments * rate)
    if n >= round(full - rate / 2):
        index, valid = reference_frame_indices(n, segments, per_segment)
    else:
        index, valid = reference_frame_indices(n, segments, per_segment, interval=int(full / segments))
    valid &= n > 0
    return np.where(valid, first + index, 0).astype(np.int64), valid


def prepare_frames(
    frames: np.ndarray,
    image_size: int = 224,
    resize: Literal["squash", "crop"] = "squash",
    interpolation: Literal["auto", "linear"] = "auto",
) -> np.ndarray:
    """uint8 RGB frames [N, H, W, 3] -> uint8 [N, image_size, image_size, 3].

    ``"squash"``: the whole frame resized to image_size x image_size (aspect ratio not kept, as
    the AVE reference fed whole frames to VGG-19). ``"crop"``: the short side resized to
    image_size (long side ``round(long * image_size / short)``), then the centre square cut.
    ``interpolation``: ``"auto"`` = ``cv2.INTER_AREA`` when the frame shrinks in both directions
    (anti-aliased), else ``cv2.INTER_LINEAR``; ``"linear"`` = ``cv2.INTER_LINEAR`` always
    (``cv2.resize``'s default, what the AVE reference called on its uint8 RGB frames). Pure numpy
    + cv2 (picklable, runs in decode worker processes).
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
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    shrink = size[0] <= w and size[1] <= h
    flag = cv2.INTER_AREA if (interpolation == "auto" and shrink) else cv2.INTER_LINEAR
    top = (size[1] - image_size) // 2
    left = (size[0] - image_size) // 2
    for k in range(n):
        resized = cv2.resize(np.ascontiguousarray(frames[k]), size, interpolation=flag)
        out[k] = resized[top: top + image_size, left: left + image_size]
    return out
