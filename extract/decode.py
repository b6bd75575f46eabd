"""Decoding one video window with decord, and a pool of killable decode worker processes.

What :func:`decode_video` does for one manifest row (a *video window*: ``start`` seconds into the
file, ``duration`` seconds long, default the first T seconds):

- **Frames.** The decoder's presentation times (``VideoReader.get_frame_timestamp``, seconds, in
  decoder order) are matched to the requested times of every :class:`~extract.extractors.FrameGrid`
  with the frame-time rule of :mod:`extract.core.frames` (``start + t + (i + 0.5) / F``, nearest pts,
  ties to the earlier frame). The union of the needed frame indices is fetched in ONE sorted,
  forward pass (``get_batch`` on sorted unique indices, in chunks of :data:`FETCH_CHUNK` frames so
  memory stays bounded), each chunk is passed through the grid's ``prepare`` (resize to the network
  input) right here in the worker, and the prepared frames are gathered into [T, F, h, w, 3].
  Requested times outside the stream (short videos) or beyond the window's ``duration`` are
  ``frame_valid`` False. decord applies rotation metadata (a 90-degree phone video comes out
  upright, e.g. 568x320 coded -> 320 wide x 568 high). The ``VideoReader`` and its timestamps
  stay open in the process for the video's next window (:mod:`extract.sources`): a long video is
  indexed once per worker, not once per window.

  Grids of the AVE reference's frame-count rule (``FrameGrid.rule == "index"``, the ``ave2018``
  recipe) pick their frames from the constant-rate frame list ffmpeg would output
  (:func:`extract.core.frames.cfr_output_frames`, fed with the stream's guessed frame rate, start offset
  and packet durations read with PyAV: :func:`stream_timing`) with
  :func:`extract.core.frames.index_rule_plan`. The decoder stays decord: on every clip of
  ../shared/media its RGB frames equal ``ffmpeg -pix_fmt rgb24`` (imageio's reader) pixel for
  pixel, rotation and the choice among two video streams included (docs/extraction.md, "Decoder").

  Measured on this project's 2-core machine, shared with other jobs (decord2 3.4, one decoder
  thread), 160 frames needed out of the first 300 of a 30 fps clip: v_ZNVhz7ctTq0.mp4 (480x360) get_batch of all 160 sorted indices
  254 ms, get_batch in chunks of 32 145 ms, reading every frame in order with ``next()`` 128 ms,
  ``get_batch(range(300))`` 221 ms; a synthetic 640x360 high-bitrate clip: 1433 / 1219 / 1347 /
  1842 ms; v_GGSY1Qvo990.mp4 (19.62 fps): 52 / 57 / 41 / 71 ms. So random access on sorted
  indices costs about the same as a sequential read with decord2 (within ~15 %), and chunking
  does not hurt; we keep chunked ``get_batch`` because it never converts unneeded frames to RGB.

- **Audio.** The file's first audio stream (the one decord's ``AudioReader`` decoded, which
  this project used before) decoded with PyAV at its native rate, channels intact, into float
  planar samples bit-identical to decord's (:mod:`extract.sources`), the channels averaged
  (:func:`extract.audio.to_mono`, as VGGish's reference does) and resampled to 16 kHz with
  :func:`extract.audio.resample` (the reference's resampy ``kaiser_best`` filter, our own torch
  implementation; FFmpeg's libswresample is never used to change the rate: on the real clips of
  ../shared/media its 16 kHz output differed from kaiser_best by 0.01 % (44.1 kHz
  v_ZNVhz7ctTq0) to 2.7 % (8 kHz nasa_13013, upsampled) relative RMS). The window is cut with
  sample 0 = ``round(start * rate)`` of the stream decoded from the file's start, plus a margin
  of 10 ms either side for the resampling filter. The windows of one video share one forward
  pass over the stream in each process (:data:`extract.sources.SOURCES`), so a window decodes
  only what lies between the previous window and its own end: time and memory grow linearly with
  the length of a video. No audio stream, or a stream without samples -> ``audio=None`` with
  ``info["audio_error"]`` (the video still gets its visual features; its segments are not
  valid, see :mod:`extract.run`). An audio stream that exists but cannot be decoded raises
  :class:`DecodeError`: the row fails (and ``--retry-failed`` computes it again).

- **Failures.** Missing, zero-byte, non-video and corrupt files raise :class:`DecodeError` with a
  one-line reason; the pool turns any exception into a failed result.

:class:`DecodePool` runs :func:`decode_video` (or any picklable function) in worker processes
started from a ``forkserver`` (never ``fork`` after torch/OpenMP started threads), each fed
through its own pipe so that killing one never corrupts a shared queue. A watchdog kills a worker
whose task runs longer than ``timeout_s`` (decord can hang inside native code on broken files),
reports that task as failed and starts a replacement. Results come back in submission order with a
bounded read-ahead, so decoding runs ahead of the network compute without unbounded memory.

Import note: importing decord *before* torch makes torch's float64 BLAS calls return garbage on
machines where torch's CUDA wheels bring NVBLAS (seen here: ``resample`` returned inf/nan).
:func:`load_decord` therefore imports torch first; use it instead of ``import decord``.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import re
import time
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

log = logging.getLogger(__name__)

__all__ = [
    "VideoRequest",
    "DecodeError",
    "Failure",
    "load_decord",
    "decode_video",
    "plan_frames",
    "picture_frames",
    "StreamTiming",
    "stream_timing",
    "DecodePool",
    "FETCH_CHUNK",
]

#: frames per ``get_batch`` call of the sorted forward pass
FETCH_CHUNK = 32
#: modules the forkserver imports once, so that workers start fast (torch before decord!)
PRELOAD = ("torch", "cv2", "extract.nets", "extract.audio", "extract.core.frames", "decord", "av", "extract.decode")


@dataclasses.dataclass(frozen=True)
class VideoRequest:
    """One video window to decode: store row ``key``, file ``path``, window ``start`` / ``duration`` (s)."""

    key: str
    path: str
    start: float = 0.0
    duration: float | None = None


class DecodeError(RuntimeError):
    """A video cannot be decoded; the message is the one-line reason stored in the ``reason`` array."""


@dataclasses.dataclass
class Failure:
    """What the pool returns instead of a result when a task failed (exception, timeout, crash)."""

    reason: str


def load_decord():
    """``import decord`` after torch (see the module's import note); returns the module."""
    import torch  # noqa: F401  - must come first

    import decord

    return decord


def _short(exc: BaseException, limit: int = 300) -> str:
    """One line from a (possibly multi-line, C++-traceback-laden) exception message."""
    text = " ".join(str(exc).split())
    text = re.sub(r"\[\d\d:\d\d:\d\d\] \S+:\d+: ", "", text)  # dmlc "[hh:mm:ss] file.cc:123: " prefixes
    return (text[:limit] + "...") if len(text) > limit else (text or type(exc).__name__)


# ------------------------------------------------------------------------------------------
# frames


def plan_frames(pts: np.ndarray, per_segment: int, segments: int, start: float = 0.0,
                duration: float | None = None, frame_duration: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Frame indices (into decoder order) and validity for one grid: ([T, F] int64, [T, F] bool).

    ``pts`` [N] are the frames' presentation times (s). Times at or beyond ``start + duration``
    (when a window duration is given) are invalid too.
    """
    from .core.frames import nearest_frame_indices, segment_frame_times

    times = segment_frame_times(segments, per_segment, start=start)
    index, valid = nearest_frame_indices(pts, times, frame_duration=frame_duration)
    if duration is not None:
        valid &= times < start + duration
    return index, valid


@dataclasses.dataclass(frozen=True)
class StreamTiming:
    """What ffmpeg's constant-rate conversion of the video stream needs (:func:`stream_timing`)."""

    #: output frames per second: ffmpeg's guessed frame rate of the stream (``r_frame_rate``, or
    #: the average rate when that is implausible)
    rate: float
    #: seconds from the container's start to the video stream's start
    offset: float
    #: the container has no other stream (ffmpeg's ``vscfr``: no duplicated initial frames)
    single_stream: bool
    #: packet durations in seconds, in presentation order, or None when unknown
    durations: np.ndarray | None


def stream_timing(path: str, frames: int | None = None) -> StreamTiming:
    """Read the video stream's timing with PyAV, demuxing packets only (no decoding).

    The stream is ``av_find_best_stream``'s (``streams.best("video")``), the one decord decodes.
    ``frames``: the decoder's frame count; packet durations are returned only when the packets
    are exactly that many (else None: :func:`extract.core.frames.cfr_output_frames` then uses the
    steps between frames). Raises ValueError when there is no video stream or no usable rate.
    """
    import av

    with av.open(str(path)) as container:
        stream = container.streams.best("video")
        if stream is None:
            raise ValueError("PyAV finds no video stream")
        rate = stream.guessed_rate or stream.average_rate
        if not rate or float(rate) <= 0:
            raise ValueError(f"video stream #{stream.index} has no frame rate")
        base = float(stream.time_base) if stream.time_base else 0.0
        start = float(stream.start_time * stream.time_base) if stream.start_time is not None and base else 0.0
        first = (container.start_time or 0) / 1_000_000
        single = len(container.streams) == 1
        packets = sorted((p.pts, p.duration or 0) for p in container.demux(stream) if p.pts is not None and p.size)
    durations = None
    if base and frames is not None and len(packets) == int(frames):
        durations = np.asarray([d for _, d in packets], dtype=np.float64) * base
    return StreamTiming(rate=float(rate), offset=start - first if not single else 0.0, single_stream=single,
                        durations=durations)


def plan_index_frames(timestamps: np.ndarray, timing: StreamTiming, per_segment: int, segments: int,
                      start: float = 0.0, duration: float | None = None, cfr=None) -> tuple[np.ndarray, np.ndarray]:
    """Frame indices (decoder order) and validity for a grid of the reference's frame-count rule:
    ([T, F] int64, [T, F] bool). ``cfr``: a precomputed :func:`extract.core.frames.cfr_output_frames`."""
    from .core.frames import cfr_output_frames, index_rule_plan

    if cfr is None:
        cfr = cfr_output_frames(timestamps, timing.rate, timing.durations, timing.offset, timing.single_stream)
    source, slot = cfr
    position, valid = index_rule_plan(slot / timing.rate, segments, per_segment, timing.rate, start, duration)
    index = source[position] if source.size else np.zeros_like(position)
    return index.astype(np.int64), valid


def _frame_duration(timestamps: np.ndarray, fps: float) -> float | None:
    """Seconds one frame is shown: median pts step, or 1/fps for one-frame streams."""
    from .core.frames import default_frame_duration

    step = default_frame_duration(timestamps[:, 0])
    if step > 0:
        return step
    single = float(timestamps[0, 1] - timestamps[0, 0]) if len(timestamps) else 0.0
    return single if single > 0 else (1.0 / fps if fps > 0 else None)


def read_frames(reader, grids: Sequence, segments: int, start: float, duration: float | None,
                timing: StreamTiming | None = None
                ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, Any]]:
    """Sample, fetch (one sorted forward pass) and prepare the frames of every grid.

    Each grid's frames follow its ``rule``: ``"pts"`` (:func:`plan_frames`) or ``"index"``
    (:func:`plan_index_frames`, which needs the stream's ``timing``, :func:`stream_timing`).
    Returns ``(frames {grid: uint8 [T, F, h, w, 3]}, valid {grid: bool [T, F]}, info)``.
    """
    count = len(reader)
    if count == 0:
        raise DecodeError("the video stream has no frames")
    timestamps = np.asarray(reader.get_frame_timestamp(np.arange(count)), dtype=np.float64).reshape(count, 2)
    fps = float(reader.get_avg_fps() or 0.0)
    frame_duration = _frame_duration(timestamps, fps)
    plans = {}
    cfr = None
    for grid in grids:
        if grid.name in plans:
            continue
        if getattr(grid, "rule", "pts") == "index":
            if timing is None:
                raise ValueError(f"frame grid {grid.name!r} uses the frame-count rule, which needs the stream timing")
            if cfr is None:
                from .core.frames import cfr_output_frames

                cfr = cfr_output_frames(timestamps[:, 0], timing.rate, timing.durations, timing.offset, timing.single_stream)
            plans[grid.name] = (grid, *plan_index_frames(timestamps[:, 0], timing, grid.per_segment, segments, start,
                                                         duration, cfr=cfr))
        else:
            plans[grid.name] = (grid, *plan_frames(timestamps[:, 0], grid.per_segment, segments, start, duration, frame_duration))
    needed = np.unique(np.concatenate([index[valid] for _, index, valid in plans.values()] + [np.zeros(0, np.int64)]))
    prepared: dict[str, list[np.ndarray]] = {name: [] for name in plans}
    shape = None
    for lo in range(0, needed.size, FETCH_CHUNK):
        chunk = needed[lo: lo + FETCH_CHUNK]
        batch = reader.get_batch(chunk.tolist()).asnumpy()
        shape = batch.shape[1:3]
        for name, (grid, _, _) in plans.items():
            prepared[name].append(np.asarray(grid.prepare(batch)))
    frames, valid_out = {}, {}
    position = np.full(count, -1, np.int64)
    position[needed] = np.arange(needed.size)
    for name, (grid, index, valid) in plans.items():
        if needed.size:
            table = np.concatenate(prepared[name])
        else:  # nothing inside the window: prepare one frame for the output shape only
            table = np.asarray(grid.prepare(reader.get_batch([0]).asnumpy()))
        gathered = table[np.where(valid, position[np.clip(index, 0, count - 1)], 0)]
        gathered[~valid] = 0
        frames[name] = np.ascontiguousarray(gathered)
        valid_out[name] = valid
    if shape is None:
        shape = reader[0].shape[:2]
    info = {
        "frames": count,
        "fps": fps,
        "video_seconds": float(timestamps[:, 1].max()),
        "height": int(shape[0]),
        "width": int(shape[1]),
        "fetched_frames": int(needed.size),
        "pts_sorted": bool(np.all(np.diff(timestamps[:, 0]) >= 0)),
        # per grid: decoder-order index [T, F] and presentation time (s) [T, F] of each chosen frame
        "frame_index": {name: index for name, (_, index, _) in plans.items()},
        "frame_pts": {name: timestamps[np.clip(index, 0, count - 1), 0] for name, (_, index, _) in plans.items()},
    }
    if cfr is not None:
        info["cfr_rate"] = timing.rate
        info["cfr_frames"] = int(cfr[0].size)
    return frames, valid_out, info


# ------------------------------------------------------------------------------------------
# frames for pictures


def picture_frames(path: str, times: Sequence[float] | None = None, *, indices: Sequence[int] | None = None,
                   size: int | None = None, resize: str = "squash") -> np.ndarray:
    """Frames of ``path`` for pictures (avel-predict's strips, render-sol), decoded exactly as the
    features' frames are: decord, rotation metadata applied (a 90-degree phone video comes out
    upright), presentation times on decord's timeline (0 = the stream's first frame, also for a
    file whose stream starts later) and the nearest-pts rule of :mod:`extract.core.frames`.

    Args:
        path: a video file.
        times: [N] seconds (any order, repeats allowed); each gets the decoded frame whose pts is
            nearest, ties to the earlier frame (:func:`extract.core.frames.nearest_frame_indices`),
            so time ``t + 0.5`` is the frame a one-frame-per-second grid takes for second ``t``;
            a time past the last frame gets the last frame, one before the first the first.
        indices: [N] frame indices in decoder order instead of times (what a store's
            ``frame_index`` array records).
        size: None for the decoded size; else :func:`extract.core.frames.prepare_frames` with
            ``resize`` (``"squash"`` / ``"crop"``), the extraction's resizing.

    Returns uint8 [N, h, w, 3]. The needed frames are fetched in one sorted forward pass, in
    chunks of :data:`FETCH_CHUNK` (each chunk resized before the next is read). Raises
    :class:`DecodeError` naming the file (missing, no video stream, undecodable).
    """
    from .core.frames import nearest_frame_indices, prepare_frames

    path = str(path)
    if (times is None) == (indices is None):
        raise ValueError("picture_frames: give times or indices, one of them")
    check_file(path)
    decord = load_decord()
    try:
        reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
    except Exception as exc:  # noqa: BLE001 - decord raises DECORDError / RuntimeError
        if "cannot find video stream" in str(exc):
            raise DecodeError(f"{path}: has no video stream") from None
        raise DecodeError(f"{path}: cannot open video: {_short(exc)}") from None
    count = len(reader)
    if count == 0:
        raise DecodeError(f"{path}: the video stream has no frames")
    if times is not None:
        wanted = np.asarray(times, dtype=np.float64).reshape(-1)
        if not np.all(np.isfinite(wanted)):
            raise ValueError(f"{path}: picture_frames got non-finite times")
        pts = np.asarray(reader.get_frame_timestamp(np.arange(count)), dtype=np.float64).reshape(count, 2)[:, 0]
        index, _ = nearest_frame_indices(pts, wanted)
    else:
        index = np.asarray(indices, dtype=np.int64).reshape(-1)
        if index.size and (index.min() < 0 or index.max() >= count):
            raise ValueError(f"{path}: frame indices outside 0..{count - 1}")
    needed = np.unique(index)
    table = []
    try:
        for lo in range(0, needed.size, FETCH_CHUNK):
            batch = reader.get_batch(needed[lo:lo + FETCH_CHUNK].tolist()).asnumpy()
            table.append(batch if size is None else prepare_frames(batch, size, resize))
    except Exception as exc:  # noqa: BLE001
        raise DecodeError(f"{path}: cannot decode video frames: {_short(exc)}") from None
    finally:
        del reader
    if not table:
        side = (0, 0) if size is None else (size, size)
        return np.zeros((0, *side, 3), np.uint8)
    return np.ascontiguousarray(np.concatenate(table)[np.searchsorted(needed, index)])


# ------------------------------------------------------------------------------------------
# audio


def read_audio(path: str, start: float, seconds: float, source=None) -> tuple[np.ndarray | None, dict[str, Any]]:
    """Mono 16 kHz float32 waveform of ``[start, start + seconds)`` (shorter if the stream ends), or None.

    The samples are those of the file's first audio stream decoded from its start
    (:class:`extract.sources.AudioStream`: sample 0 = the decoder's first output sample, the
    window's first sample = ``round(start * rate)``); ``source`` is the video's
    :class:`extract.sources.OpenVideo`, whose stream goes on where the previous window of the
    video stopped (without one, the file is decoded from its start up to the window's end).

    None (reason in ``info["audio_error"]``) only when the file has no audio stream or its stream
    decodes to no samples at all: the video is then visual-only. An audio stream that exists but
    cannot be opened, decoded or read (corrupt packets, an unknown codec, no sample rate, an I/O
    error) raises :class:`DecodeError` with the reason: the row fails and is computed again by
    ``--retry-failed``. Otherwise ``info["audio_resampler"]`` is ``"kaiser_best"``
    (:func:`extract.audio.resample`), ``info["audio_rate"]`` / ``info["audio_channels"]`` the
    stream's.
    """
    from .audio import SAMPLE_RATE, resample, to_mono
    from .sources import AudioDecodeError, NoAudioStream, OpenVideo

    entry = source
    if entry is None:
        try:
            entry = OpenVideo(path)
        except OSError as exc:
            raise DecodeError(f"cannot read {path}: {_short(exc)}") from None
    info: dict[str, Any] = {}
    if entry.no_audio:
        info["audio_error"] = "no audio stream"
        return None, info
    try:
        stream = entry.audio()
        rate = stream.rate
        first, last = int(round(start * rate)), int(round((start + seconds) * rate))
        # a few samples of context either side keep the resampling filter's edges faithful
        pad = int(rate // 100)
        lo = max(0, first - pad)
        if lo < stream.base:  # an earlier window than the stream's position: decode from the start again
            stream = entry.audio(reopen=True)
        samples = stream.read(lo, last + pad)  # [C, n] native rate, sample 0 = lo
    except NoAudioStream:
        entry.no_audio = True
        info["audio_error"] = "no audio stream"
        return None, info
    except AudioDecodeError as exc:
        entry.drop_audio()
        raise DecodeError(f"the audio stream cannot be decoded: {exc}") from None
    finally:
        if source is None:
            entry.close()
    if stream.ended and stream.decoded == 0:
        info["audio_error"] = "audio stream is empty"
        return None, info
    piece = resample(to_mono(samples), rate, SAMPLE_RATE)
    offset = int(round((first - lo) * SAMPLE_RATE / rate))
    wave = piece[offset: offset + int(round(seconds * SAMPLE_RATE))]
    info.update(audio_resampler="kaiser_best", audio_rate=rate, audio_channels=int(stream.channels),
                audio_codec=stream.codec)
    return np.ascontiguousarray(wave, dtype=np.float32), info


# ------------------------------------------------------------------------------------------
# one video


def check_file(path: str) -> None:
    """DecodeError for a missing, unreadable or empty file (before handing it to decord)."""
    if not os.path.exists(path):
        raise DecodeError(f"file not found: {path}")
    if not os.path.isfile(path):
        raise DecodeError(f"not a regular file: {path}")
    if os.path.getsize(path) == 0:
        raise DecodeError(f"empty file (0 bytes): {path}")
    if not os.access(path, os.R_OK):
        raise DecodeError(f"file is not readable: {path}")


def decode_video(request: VideoRequest, grids: Sequence, segments: int, audio: bool = True):
    """Decode one video window into a :class:`~extract.extractors.DecodedVideo`.

    ``grids`` are the extractors' :class:`~extract.extractors.FrameGrid` objects; ``audio=False``
    skips the audio stream. The window is ``[start, start + min(duration, T))`` seconds.
    Raises :class:`DecodeError` (with the reason) when the video cannot be used at all.
    """
    from .extractors import DecodedVideo
    from .sources import SOURCES

    check_file(request.path)
    decord = load_decord()
    seconds = float(segments if request.duration is None else min(request.duration, segments))
    entry = SOURCES.take(request.path)  # the readers of this video's previous window, if this process has them
    keep = False
    try:
        try:
            reader = entry.frames(lambda path: decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1))
        except Exception as exc:  # noqa: BLE001
            raise DecodeError(f"cannot open video: {_short(exc)}") from None
        try:
            timing = None
            if any(getattr(g, "rule", "pts") == "index" for g in grids):
                if entry.timing is None:  # packets read once per video, not once per window
                    entry.timing = stream_timing(request.path, frames=len(reader))
                timing = entry.timing
            frames, valid, info = read_frames(reader, grids, segments, request.start, request.duration, timing)
        except DecodeError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise DecodeError(f"cannot decode video frames: {_short(exc)}") from None
        wave = None
        if audio:
            wave, audio_info = read_audio(request.path, request.start, seconds, source=entry)
            info.update(audio_info)
        keep = True
    finally:
        if keep:
            SOURCES.give_back(entry)
        else:
            entry.close()
    info["window"] = [request.start, seconds]
    return DecodedVideo(key=request.key, frames=frames, frame_valid=valid, audio=wave, info=info)


# ------------------------------------------------------------------------------------------
# the pool


def _worker_main(conn, threads: int) -> None:
    """Worker loop: say ``READY``, then receive ``(seq, fn, args)`` and send back
    ``(seq, ok, result or reason)``; None stops."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business: it kills us
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        import torch

        torch.set_num_threads(threads)
    except Exception:  # noqa: BLE001 - torch is optional for custom task functions
        pass
    try:
        import cv2

        cv2.setNumThreads(threads)
    except Exception:  # noqa: BLE001
        pass
    conn.send(_READY)
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        seq, fn, args = message
        try:
            reply = (seq, True, fn(*args))
        except BaseException as exc:  # noqa: BLE001 - every failure becomes a reason
            reply = (seq, False, _short(exc) if isinstance(exc, DecodeError) else f"{type(exc).__name__}: {_short(exc)}")
        try:
            conn.send(reply)
        except Exception as exc:  # noqa: BLE001 - e.g. an unpicklable result
            conn.send((seq, False, f"cannot send the result back: {_short(exc)}"))


_READY = "ready"


@dataclasses.dataclass
class _Worker:
    process: Any
    conn: Any
    ready: bool = False
    seq: int | None = None
    started: float = 0.0


def _context(method: str | None):
    method = method or ("forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn")
    ctx = multiprocessing.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(list(PRELOAD))
    return ctx


def warm_up(start_method: str | None = None) -> None:
    """Start the forkserver now (it imports torch, cv2 and decord in the background), so that
    this overlaps other start-up work such as loading the networks. No-op for other methods."""
    ctx = _context(start_method)
    if ctx.get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()


class DecodePool:
    """Worker processes with a per-task timeout that kills hung workers.

    Use :meth:`imap` to run ``fn(*args)`` for every ``args`` tuple; results (or :class:`Failure`)
    are yielded in input order. At most ``ahead`` tasks are in flight or finished-but-unconsumed,
    which bounds memory (each result is a decoded video). Killed or crashed workers are replaced.
    A task's clock starts when a started (ready) worker receives it, so slow worker start-up never
    counts against ``timeout_s``.

    ``fn`` and its arguments must be picklable (module-level functions). Close with :meth:`close`
    or use the pool as a context manager.
    """

    #: give up when this many workers in a row die before saying they are ready
    MAX_STARTUP_FAILURES = 5

    def __init__(self, workers: int, timeout_s: float, *, ahead: int | None = None,
                 threads_per_worker: int = 1, start_method: str | None = None):
        if workers < 1:
            raise ValueError(f"DecodePool: need at least one worker, got {workers}")
        self.size = int(workers)
        self.timeout_s = float(timeout_s)
        self.ahead = max(self.size, int(ahead if ahead is not None else 2 * self.size))
        self.threads = max(1, int(threads_per_worker))
        self.ctx = _context(start_method)
        self.workers: list[_Worker] = []
        self.killed = 0
        self.crashed = 0
        self._startup_failures = 0
        self._cancelled = False

    def cancel(self) -> None:
        """Make a running :meth:`imap` return soon (within about a second); used when aborting."""
        self._cancelled = True

    # -- workers ------------------------------------------------------------------------------
    def _spawn(self) -> _Worker:
        parent, child = self.ctx.Pipe(duplex=True)
        process = self.ctx.Process(target=_worker_main, args=(child, self.threads), daemon=True, name="avel-decode")
        process.start()
        child.close()
        return _Worker(process, parent)

    def _retire(self, worker: _Worker, kill: bool) -> None:
        if kill and worker.process.is_alive():
            worker.process.kill()
        worker.process.join(timeout=10)
        worker.conn.close()
        self.workers.remove(worker)

    def start(self) -> "DecodePool":
        while len(self.workers) < self.size:
            self.workers.append(self._spawn())
        return self

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Block until every worker has started (useful before timing)."""
        deadline = time.monotonic() + timeout_s
        while not all(w.ready for w in self.workers) and time.monotonic() < deadline:
            self._collect({})

    def close(self) -> None:
        for worker in list(self.workers):
            try:
                if worker.seq is None:
                    worker.conn.send(None)
            except OSError:
                pass
        deadline = time.monotonic() + 5
        for worker in list(self.workers):
            worker.process.join(timeout=max(0.0, deadline - time.monotonic()))
            self._retire(worker, kill=True)

    def __enter__(self) -> "DecodePool":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- running ------------------------------------------------------------------------------
    def imap(self, fn: Callable, tasks: Iterable[tuple]) -> Iterator[Any]:
        """Yield ``fn(*task)`` (or :class:`Failure`) for each task, in order."""
        self.start()
        self._cancelled = False
        pending = collections.deque(enumerate(tasks))
        results: dict[int, Any] = {}
        next_out = 0
        while not self._cancelled:
            if next_out in results:
                yield results.pop(next_out)
                next_out += 1
                continue
            window = sum(w.seq is not None for w in self.workers) + len(results)
            for worker in self.workers:
                if not pending or window >= self.ahead:
                    break
                if worker.ready and worker.seq is None:
                    seq, args = pending.popleft()
                    worker.seq, worker.started = seq, time.monotonic()
                    worker.conn.send((seq, fn, tuple(args)))
                    window += 1
            if not pending and not any(w.seq is not None for w in self.workers):
                return  # the next result in order is always either running or in ``results``
            self._collect(results)

    def _collect(self, results: dict[int, Any]) -> None:
        """Wait for replies, start-ups or the earliest deadline; handle timeouts and dead workers."""
        watched = [w for w in self.workers if w.seq is not None or not w.ready]
        if not watched:
            return
        busy = [w for w in watched if w.seq is not None]
        now = time.monotonic()
        wait_s = min([w.started + self.timeout_s - now for w in busy] + [1.0])
        multiprocessing.connection.wait([w.conn for w in watched] + [w.process.sentinel for w in watched],
                                        timeout=max(0.0, wait_s))
        for worker in watched:
            if worker.conn.poll():
                try:
                    message = worker.conn.recv()
                except (EOFError, OSError):
                    self._replace_dead(worker, results)
                    continue
                if message == _READY:
                    worker.ready = True
                    self._startup_failures = 0
                    continue
                seq, ok, value = message
                results[seq] = value if ok else Failure(str(value))
                worker.seq = None
            elif not worker.process.is_alive():
                self._replace_dead(worker, results)
            elif worker.seq is not None and time.monotonic() - worker.started > self.timeout_s:
                seq = worker.seq
                log.warning("decode task %d ran over %g s: killing worker pid %d", seq, self.timeout_s, worker.process.pid)
                self._retire(worker, kill=True)
                self.killed += 1
                results[seq] = Failure(f"decode timed out after {self.timeout_s:g} s (worker killed)")
                self.workers.append(self._spawn())

    def _replace_dead(self, worker: _Worker, results: dict[int, Any]) -> None:
        seq, ready = worker.seq, worker.ready
        self._retire(worker, kill=True)
        code = worker.process.exitcode
        if not ready:
            self._startup_failures += 1
            if self._startup_failures >= self.MAX_STARTUP_FAILURES:
                raise RuntimeError(f"DecodePool: {self._startup_failures} decode workers in a row died while "
                                   f"starting (last exit code {code}); check that decord and torch import")
        else:
            self.crashed += 1
        if seq is not None:
            results[seq] = Failure(f"decode worker died (exit code {code})")
        self.workers.append(self._spawn())
