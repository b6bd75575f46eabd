"""Encoding videos with PyAV: the one place avel writes video files.

- :func:`write_clip` encodes frames (and audio) into a clip: the demo's videos and test fixtures;
- :func:`write_painted_video` re-encodes a video with every frame painted by a caller's function
  (avel-predict's ``overlay.mp4``: :func:`train.predict.plots.write_overlay_video` paints the
  attention and the label track), copying the audio stream unchanged.

Errors are told apart by type, raised where they happen: :class:`VideoReadError` (the input cannot
be opened or decoded), :class:`EncodeError` (the output cannot be written or encoded),
:class:`AudioCopyError` (copying the audio failed: the video is then written again without audio).
Imports numpy only at import time (PyAV and cv2 inside the functions); nothing of either stage.
"""
from __future__ import annotations

import fractions
import logging
from pathlib import Path
from typing import Callable

import numpy as np

log = logging.getLogger(__name__)


def _rate(fps: float | fractions.Fraction) -> fractions.Fraction:
    if isinstance(fps, fractions.Fraction):
        return fps
    return fractions.Fraction(fps).limit_denominator(1001)


def write_clip(
    path: str | Path,
    frames: np.ndarray | None,
    fps: float | fractions.Fraction = 25,
    audio: np.ndarray | None = None,
    sample_rate: int = 44100,
    *,
    video_codec: str = "libx264",
    audio_codec: str = "aac",
    crf: int = 18,
) -> Path:
    """Encode ``frames`` (uint8 RGB [N, H, W, 3], H and W even) at ``fps`` and ``audio``
    (float32 in [-1, 1], [channels, samples] or [samples]) into one container file.

    Either stream may be None (a silent video, or an audio-only file). Returns ``path``.
    """
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    container = av.open(str(path), mode="w")
    try:
        vstream = astream = None
        if frames is not None:
            frames = np.asarray(frames, dtype=np.uint8)
            if frames.ndim != 4 or frames.shape[-1] != 3:
                raise ValueError(f"frames must be [N, H, W, 3] uint8, got {frames.shape}")
            vstream = container.add_stream(video_codec, rate=_rate(fps))
            vstream.height, vstream.width = int(frames.shape[1]), int(frames.shape[2])
            vstream.pix_fmt = "yuv420p"
            if video_codec == "libx264":
                vstream.options = {"crf": str(crf), "preset": "veryfast"}
        if audio is not None:
            audio = np.asarray(audio, dtype=np.float32)
            if audio.ndim == 1:
                audio = audio[None, :]
            layout = {1: "mono", 2: "stereo", 6: "5.1"}.get(audio.shape[0])
            if layout is None:
                raise ValueError(f"audio with {audio.shape[0]} channels is not supported (1, 2 or 6)")
            astream = container.add_stream(audio_codec, rate=int(sample_rate))
            astream.layout = layout
        if vstream is not None:
            for image in frames:
                frame = av.VideoFrame.from_ndarray(image, format="rgb24")
                for packet in vstream.encode(frame):
                    container.mux(packet)
            for packet in vstream.encode():
                container.mux(packet)
        if astream is not None:
            encode_audio(container, astream, audio)
    finally:
        container.close()
    return path


def encode_audio(container, stream, planar: np.ndarray, block: int = 1024) -> None:
    """Encode float32 audio [channels, samples] (in [-1, 1]) into the audio ``stream`` of the
    output ``container``, ``block`` samples per frame at the stream's rate, flush the encoder and
    mux every packet."""
    import av

    planar = np.ascontiguousarray(planar, dtype=np.float32)
    for start in range(0, planar.shape[1], block):
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(planar[:, start:start + block]), format="fltp",
                                           layout=stream.layout.name)
        frame.sample_rate = int(stream.rate)
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)


# ------------------------------------------------------------------------------------------
# painted copies of a video (avel-predict's overlay.mp4)


class VideoReadError(ValueError):
    """A video cannot be read: missing, not a video, no video stream, undecodable (names the file)."""


class EncodeError(RuntimeError):
    """The output video cannot be written or encoded (names the file)."""


class AudioCopyError(RuntimeError):
    """Copying the input's audio stream into the output failed (opening, or muxing its packets or
    the video's beside them)."""


#: audio codecs that can be copied into an MP4 unchanged
MP4_AUDIO = {"aac", "mp3", "ac3", "eac3", "alac", "opus", "flac"}


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def even(x: float) -> int:
    """The nearest even integer >= 2 (yuv420p needs even sides)."""
    return max(2, int(round(x / 2.0)) * 2)


def output_size(width: int, height: int, size: int | None) -> tuple[int, int]:
    """(W, H) of an output picture: short side ``size`` (aspect ratio kept), both even; None: the input's."""
    if not size:
        return even(width), even(height)
    scale = float(size) / min(width, height)
    return even(width * scale), even(height * scale)


def rotation_turns(frame) -> int:
    """Quarter turns (counter-clockwise, ``np.rot90``) that make a PyAV frame upright, from its
    rotation metadata, as decord applies it."""
    return int(round(float(getattr(frame, "rotation", 0) or 0) / 90.0)) % 4


def upright_rgb(frame) -> np.ndarray:
    """RGB uint8 [H, W, 3] of a decoded PyAV frame with its rotation metadata applied."""
    image = frame.to_ndarray(format="rgb24")
    turns = rotation_turns(frame)
    return np.ascontiguousarray(np.rot90(image, k=turns)) if turns else image


def open_video(path: Path):
    """(container, first video stream) of ``path`` for decoding; :class:`VideoReadError` naming the file."""
    import av

    if not path.is_file():
        raise VideoReadError(f"{path}: no such file")
    try:
        container = av.open(str(path))
    except Exception as exc:  # noqa: BLE001 - av.error.* (InvalidDataError, ...), OSError
        raise VideoReadError(f"{path}: cannot be opened as a video ({_one_line(exc)})") from None
    if not container.streams.video:
        container.close()
        raise VideoReadError(f"{path}: has no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    return container, stream


class _Encoder:
    """The output file: an H.264 stream (mpeg4 when PyAV's FFmpeg lacks libx264), yuv420p, and
    optionally a copy of an input audio stream. Every call into PyAV raises the error type of its
    place: opening and encoding raise :class:`EncodeError`, anything touching the audio copy
    :class:`AudioCopyError` (a failed mux of video packets too, while audio is copied beside them:
    the muxer interleaves both)."""

    def __init__(self, out_path: Path, width: int, height: int, rate: fractions.Fraction, audio_template):
        import av

        self.path = out_path
        try:
            self.container = av.open(str(out_path), mode="w")
        except Exception as exc:  # noqa: BLE001 - OSError, av.error.*
            raise EncodeError(f"{out_path}: cannot be written ({_one_line(exc)})") from exc
        try:
            self.stream, self.codec = self._video_stream(width, height, rate)
            self.audio = None
            if audio_template is not None:
                try:
                    self.audio = self.container.add_stream_from_template(audio_template)
                except Exception as exc:  # noqa: BLE001
                    raise AudioCopyError(f"{out_path}: the audio stream cannot be added ({_one_line(exc)})") from exc
        except BaseException:
            self.container.close()
            raise
        self.pending_audio: list = []
        self.frames = 0

    def _video_stream(self, width: int, height: int, rate: fractions.Fraction):
        stream = codec = None
        for codec in ("libx264", "mpeg4"):
            try:
                stream = self.container.add_stream(codec, rate=rate)
                break
            except Exception as exc:  # noqa: BLE001 - av.codec.codec.UnknownCodecError, ValueError
                log.info("encoder %s unavailable (%s)", codec, exc)
        if stream is None:
            raise EncodeError(f"{self.path}: neither libx264 nor mpeg4 can encode here (PyAV's FFmpeg lacks both)")
        if codec != "libx264":
            log.warning("libx264 is not available: writing %s with mpeg4 instead", self.path)
        try:
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.time_base = 1 / rate
            if codec == "libx264":
                stream.options = {"crf": "20", "preset": "veryfast"}
            else:
                stream.bit_rate = int(max(1_000_000, width * height * float(rate) * 0.25))
        except Exception as exc:  # noqa: BLE001
            raise EncodeError(f"{self.path}: the {codec} stream cannot be set up ({_one_line(exc)})") from exc
        return stream, codec

    def _mux(self, packets) -> None:
        try:
            for packet in packets:
                self.container.mux(packet)
        except Exception as exc:  # noqa: BLE001 - av.error.* from the muxer
            if self.audio is not None:
                raise AudioCopyError(f"{self.path}: muxing beside the copied audio failed ({_one_line(exc)})") from exc
            raise EncodeError(f"{self.path}: cannot be written ({_one_line(exc)})") from exc

    def write(self, image: np.ndarray) -> None:
        """Encode one picture (uint8 RGB [H, W, 3]) as the next frame."""
        import av

        try:
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = self.frames
            packets = self.stream.encode(frame)
        except Exception as exc:  # noqa: BLE001
            raise EncodeError(f"{self.path}: frame {self.frames} cannot be encoded ({_one_line(exc)})") from exc
        self._mux(packets)
        self.frames += 1

    def copy_audio(self, packet) -> None:
        """Copy an input audio packet (held back until the output exists, then in order)."""
        if self.audio is None:
            return
        try:
            packet.stream = self.audio
            self.container.mux(packet)
        except Exception as exc:  # noqa: BLE001
            raise AudioCopyError(f"{self.path}: an audio packet cannot be copied ({_one_line(exc)})") from exc

    def finish(self) -> None:
        try:
            packets = self.stream.encode()
        except Exception as exc:  # noqa: BLE001
            raise EncodeError(f"{self.path}: the encoder cannot be flushed ({_one_line(exc)})") from exc
        self._mux(packets)

    def close(self) -> None:
        try:
            self.container.close()
        except Exception as exc:  # noqa: BLE001 - closing after an earlier failure
            log.debug("closing %s: %s", self.path, exc)


def _decoded(container, streams, path: Path):
    """(packet, [decoded frames]) of the input in demux order; :class:`VideoReadError` when a
    packet cannot be demuxed or decoded (audio packets are not decoded: they are copied)."""
    packets = container.demux(*streams)
    while True:
        try:
            packet = next(packets)
            frames = packet.decode() if packet.stream.type == "video" else []
        except StopIteration:
            return
        except Exception as exc:  # noqa: BLE001 - av.error.* while demuxing / decoding
            raise VideoReadError(f"{path}: cannot be decoded ({_one_line(exc)})") from None
        yield packet, frames


def write_painted_video(path: str | Path, out_path: str | Path, paint: Callable[[np.ndarray, float], np.ndarray], *,
                        fps: float | None = None, size: int | None = 224, audio: bool = True) -> Path:
    """Re-encode ``path`` as an MP4 whose every frame is ``paint(picture, seconds)``.

    Args:
        path: the input video; out_path: the MP4 to write (folders created).
        paint: called with each decoded frame as uint8 RGB [h, w, 3] (rotation applied, resized to
            the output size) and its time in seconds on the decoder's timeline (0 = the video
            stream's first frame, as decord and the features count); returns the picture to
            encode, uint8 RGB [H, W, 3] with even H and W, the same shape for every frame (it may
            add rows, e.g. a label track below). Called once per decoded frame that is written.
        fps: output frame rate; None: the stream's native (average) rate. Output frame ``k``
            (time ``k / fps``) shows the last decoded frame at or before that time (frames
            dropped or repeated to reach the rate); the video lasts until the last frame's end
            (``duration * fps`` frames, +-1).
        size: the picture's short side in pixels, aspect ratio kept, even sides; None: native.
        audio: copy the first audio stream unchanged when MP4 can hold its codec (:data:`MP4_AUDIO`);
            if copying it fails (:class:`AudioCopyError`) the video is written again without audio.

    Encoded with libx264 (crf 20), mpeg4 when libx264 is absent, yuv420p. Returns ``out_path``.
    Raises :class:`VideoReadError` (the input) or :class:`EncodeError` (the output).
    """
    path, out_path = Path(path), Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return _write_painted(path, out_path, paint, fps, size, audio)
    except AudioCopyError as exc:
        log.warning("%s: copying the audio failed (%s); writing the video without audio", path, exc)
        return _write_painted(path, out_path, paint, fps, size, False)


def _write_painted(path: Path, out_path: Path, paint, fps, size, audio: bool) -> Path:
    import cv2

    container, stream = open_video(path)
    out: _Encoder | None = None
    try:
        native = stream.average_rate or stream.guessed_rate
        if not native or float(native) <= 0:
            native = fractions.Fraction(25)
        rate = fractions.Fraction(fps).limit_denominator(1001) if fps else fractions.Fraction(native)
        frame_step = 1.0 / float(native)
        origin = float(stream.start_time * stream.time_base) if stream.start_time is not None and stream.time_base else 0.0
        in_audio = None
        if audio and container.streams.audio:
            candidate = container.streams.audio[0]
            if candidate.codec_context.name in MP4_AUDIO:
                in_audio = candidate
            else:
                log.info("%s: audio codec %s is not copied into MP4", path, candidate.codec_context.name)
        streams = [stream] + ([in_audio] if in_audio is not None else [])
        geometry: dict[str, int] = {}

        def picture(entry) -> np.ndarray:
            """The painted picture of a decoded frame entry [seconds, frame, cache] (opens the output)."""
            nonlocal out
            if entry[2] is not None:
                return entry[2]
            frame = entry[1]
            if not geometry:
                turns = rotation_turns(frame)
                upright = (frame.height, frame.width) if turns % 2 else (frame.width, frame.height)
                geometry["w"], geometry["h"] = output_size(upright[0], upright[1], size)
            w, h = geometry["w"], geometry["h"]
            rgb = upright_rgb(frame)
            if rgb.shape[:2] != (h, w):
                shrink = w <= rgb.shape[1] and h <= rgb.shape[0]
                rgb = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
            image = np.ascontiguousarray(paint(rgb, entry[0]), dtype=np.uint8)
            if out is None:
                if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] % 2 or image.shape[1] % 2:
                    raise ValueError(f"write_painted_video: paint must return even-sided RGB pictures, got {image.shape}")
                out = _Encoder(out_path, image.shape[1], image.shape[0], rate, in_audio)
                for held in pending_audio:
                    out.copy_audio(held)
                pending_audio.clear()
            entry[2] = image
            return image

        def emit(entry, until: float) -> None:
            """Write output frames k with time k / rate < ``until`` showing ``entry``."""
            while float(out_frames[0] / rate) < until - 1e-9:
                image = picture(entry)
                out.write(image)  # type: ignore[union-attr]
                out_frames[0] += 1

        out_frames = [0]
        pending_audio: list = []
        previous = None
        index = 0
        for packet, frames in _decoded(container, streams, path):
            if packet.stream.type == "audio":
                if packet.dts is None:
                    continue
                if out is None:
                    pending_audio.append(packet)
                else:
                    out.copy_audio(packet)
                continue
            for frame in frames:
                seconds = float(frame.time) - origin if frame.time is not None else index * frame_step
                entry = [seconds, frame, None]
                index += 1
                if previous is not None:
                    emit(previous, entry[0])
                elif entry[0] > 0:
                    emit(entry, entry[0])  # the first frame also covers [0, its time)
                previous = entry
        if previous is not None:
            emit(previous, previous[0] + frame_step)
        if out is None:
            raise VideoReadError(f"{path}: no decodable video frame")
        out.finish()
        log.info("wrote %s: %d frames at %.3g fps (%s)", out_path, out.frames, float(rate), out.codec)
    finally:
        container.close()
        if out is not None:
            out.close()
    return out_path
