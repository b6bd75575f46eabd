"""Readers a video's windows share: one forward pass over the audio, one decord VideoReader per video.

A long video becomes many manifest rows (windows ``start = 0, T, 2T, ...``), each decoded by
:func:`extract.decode.decode_video` in a decode worker. Opening the file again for every window
made the cost grow with the square of the length: decord's ``AudioReader`` decodes the *whole*
audio track into memory before one window is cut from it, and every ``VideoReader`` reads every
packet of the file to index it. Here a process keeps the readers of the videos it decoded last
(:data:`SOURCES`, at most :data:`KEEP_OPEN` videos), so the next window of the same video goes on
where the previous one stopped:

- **Audio** (:class:`AudioStream`): PyAV decodes the first audio stream packet by packet, forward
  only, and keeps only the samples from the start of the last window asked for onwards. A window
  reads what lies between the previous window it served and its own end, plus the resampling
  margin; the memory held is one window, whatever the length of the file. A window that starts
  before the kept samples (windows out of order) reopens the file and decodes from its start:
  slower, never different.
- **Frames** (:class:`CachedFrames`): the decord ``VideoReader`` stays open, with its frame
  timestamps read once (opening one reads every packet of the file to index it). After each
  window it is rewound to frame 0 (:meth:`CachedFrames.rewind`: decord's seek empties its decoder
  queues, which its decoder thread otherwise fills with the rest of the file while the worker
  waits), so every window's ``get_batch`` starts as a fresh reader's does: it seeks to the
  keyframe before the window's first frame and decodes from there.

**Same samples as before.** Sample ``i`` of the stream is the ``i``-th sample the decoder outputs
from the start of the file, all frames concatenated, exactly what decord's ``AudioReader``
returned (``audio_reader.cc``: every packet of the first audio stream in file order through
``avcodec_send_packet`` / ``avcodec_receive_frame``, converted to float planar by libswresample
at the same rate and layout, no use of timestamps); sample 0 is the first sample the decoder
gives, after the codec's own priming or pre-skip removal (AAC edit lists, Opus pre-skip). On the
real clips of ../shared/media (AAC 44.1 kHz mono, 48 kHz 5.1, 8 kHz stereo with two audio
streams, Opus in Matroska) the arrays are bit-identical to decord's, checked by
tests/test_stream_decode.py. The stream is never sought: after a seek an AAC/SBR or Opus decoder
starts from another state and its output differs slightly, so exact equality needs the pass from
the start. With several decode workers each worker makes its own pass over a long video
(decoding audio costs a few seconds per hour of AAC); all work stays proportional to the length.

**Failures.** A decoding error (corrupt packets, an unknown codec, an I/O error) raises
:class:`AudioDecodeError` and the stream is dropped (the next window reopens the file); only "no
audio stream" (:class:`NoAudioStream`) and a stream that decodes to no samples at all are normal
outcomes (a visual-only row, see :func:`extract.decode.read_audio`).

Thread safety: :meth:`Sources.take` hands an entry to one caller at a time (a second thread
asking for the same video while it is out opens its own), so Dask workers with several threads
never share a reader.
"""
from __future__ import annotations

import collections
import logging
import os
import threading
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["AudioStream", "AudioDecodeError", "NoAudioStream", "CachedFrames", "OpenVideo", "Sources", "SOURCES",
           "KEEP_OPEN", "to_float_planar"]

#: videos whose readers a process keeps open between windows
KEEP_OPEN = 2


class AudioDecodeError(RuntimeError):
    """The audio stream exists but cannot be decoded; the message is the reason."""


class NoAudioStream(AudioDecodeError):
    """The file has no audio stream (a normal, visual-only video)."""


# integer formats: libswresample's conversion to float (audioconvert.c: x * 2^-(bits-1), u8 centred)
_INT_SCALE = {"s16": 1.0 / (1 << 15), "s32": 1.0 / (1 << 31), "s64": 1.0 / (1 << 63)}


def to_float_planar(frame) -> np.ndarray:
    """A decoded PyAV audio frame as float32 [C, n], channels first: what libswresample gives for
    the conversion to ``AV_SAMPLE_FMT_FLTP`` at the same rate and layout (decord's output).

    Float input is passed through (``dbl`` rounded to float32), ``s16``/``s32``/``s64`` are
    scaled by ``2^-(bits-1)`` after the conversion to float32, ``u8`` is centred on 128 and
    scaled by ``2^-7``; interleaved formats are de-interleaved.
    """
    fmt = frame.format
    name = fmt.name[:-1] if fmt.is_planar else fmt.name  # "s16p" -> "s16"
    data = frame.to_ndarray()
    channels = int(frame.layout.nb_channels) or 1
    if not fmt.is_planar:
        data = data.reshape(-1, channels).T
    if name == "flt":
        return np.ascontiguousarray(data, dtype=np.float32)
    if name == "dbl":
        return data.astype(np.float32)
    if name in _INT_SCALE:
        return data.astype(np.float32) * np.float32(_INT_SCALE[name])
    if name == "u8":
        return (data.astype(np.int32) - 128).astype(np.float32) * np.float32(1.0 / 128)
    raise AudioDecodeError(f"unsupported audio sample format {fmt.name!r}")


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class AudioStream:
    """Forward-only decoding of the first audio stream of ``path``: :meth:`read` returns the
    native-rate samples [C, n] float32 of sample indices ``[lo, hi)`` (fewer where the stream
    ends). ``rate`` (Hz) and ``channels`` are the stream's (codec parameters, read with PyAV).

    Raises :class:`NoAudioStream` when the file has none and :class:`AudioDecodeError` when it
    cannot be opened or decoded; after an error the stream must not be used again.
    """

    def __init__(self, path: str):
        import av

        self.path = str(path)
        try:
            self.container = av.open(self.path)
        except Exception as exc:  # noqa: BLE001 - av.error.* / OSError: the reason goes to the row
            raise AudioDecodeError(f"cannot open the file for its audio: {_short(exc)}") from None
        try:
            streams = self.container.streams.audio
            if not streams:
                raise NoAudioStream("no audio stream")
            self.stream = streams[0]  # decord's choice: the first audio stream in file order
            context = self.stream.codec_context
            self.rate = int(context.sample_rate or 0)
            if self.rate <= 0:
                raise AudioDecodeError(f"audio stream #{self.stream.index} declares no sample rate ({self.rate})")
            self.channels = int(context.layout.nb_channels if context.layout is not None else 0) or 1
            self.codec = str(context.name)
        except BaseException:
            self.close()
            raise
        self._packets = self.container.demux(self.stream)
        self._chunks: collections.deque[tuple[int, np.ndarray]] = collections.deque()  # (first index, [C, n])
        self.base = 0  # index of the earliest sample still available (kept, or not decoded yet)
        self.decoded = 0  # samples decoded so far (index one past the last)
        self.ended = False
        self.bytes_kept = 0

    def close(self) -> None:
        container = getattr(self, "container", None)
        if container is not None:
            try:
                container.close()
            except Exception:  # noqa: BLE001
                pass
            self.container = None

    def _next_frames(self) -> list:
        """Decode the next packet (the flush packet at the end drains the decoder)."""
        try:
            packet = next(self._packets)
        except StopIteration:
            self.ended = True
            return []
        except Exception as exc:  # noqa: BLE001 - read errors (EIO, truncated file)
            raise AudioDecodeError(f"reading audio packets failed after {self.decoded} samples: {_short(exc)}") from None
        try:
            return packet.decode()
        except Exception as exc:  # noqa: BLE001 - corrupt data, codec errors
            raise AudioDecodeError(f"audio decoding failed after {self.decoded} samples "
                                   f"({self.decoded / self.rate:.2f} s): {_short(exc)}") from None

    def read(self, lo: int, hi: int) -> np.ndarray:
        """Samples ``[lo, hi)`` (native rate, [C, n] float32; n < hi - lo where the stream ends).
        Samples before ``lo`` are forgotten; ``lo`` must not be smaller than :attr:`base`."""
        lo, hi = max(0, int(lo)), max(0, int(hi))
        if lo < self.base:
            raise ValueError(f"AudioStream.read({lo}, {hi}): samples before {self.base} are gone (forward only)")
        self._forget(lo)
        self.base = lo
        while self.decoded < hi and not self.ended:
            for frame in self._next_frames():
                first, count = self.decoded, int(frame.samples)
                self.decoded += count
                if self.decoded <= lo or count == 0:
                    continue  # decoded (the decoder's state needs it) but not converted
                samples = to_float_planar(frame)
                if samples.shape[1] != count:
                    raise AudioDecodeError(f"audio frame of {count} samples converted to {samples.shape[1]}")
                self._chunks.append((first, samples))
                self.bytes_kept += samples.nbytes
        pieces = [chunk[:, max(0, lo - first): max(0, min(hi, first + chunk.shape[1]) - first)]
                  for first, chunk in self._chunks if first < hi and first + chunk.shape[1] > lo]
        if not pieces:
            return np.zeros((self.channels, 0), np.float32)
        channels = {p.shape[0] for p in pieces}
        if len(channels) != 1:
            raise AudioDecodeError(f"the number of audio channels changes inside the stream ({sorted(channels)})")
        return np.ascontiguousarray(np.concatenate(pieces, axis=1))

    def _forget(self, lo: int) -> None:
        while self._chunks and self._chunks[0][0] + self._chunks[0][1].shape[1] <= lo:
            self.bytes_kept -= self._chunks.popleft()[1].nbytes


class CachedFrames:
    """A decord ``VideoReader`` whose frame timestamps and mean rate are read once; everything
    else (``get_batch``, indexing, ...) is the reader's own."""

    def __init__(self, reader):
        self._reader = reader
        self._count = len(reader)
        self._timestamps = None
        self._fps = None

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index):
        return self._reader[index]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reader, name)

    def get_frame_timestamp(self, index) -> np.ndarray:
        if self._timestamps is None:
            every = self._reader.get_frame_timestamp(np.arange(self._count)) if self._count else np.zeros((0, 2))
            self._timestamps = np.asarray(every, dtype=np.float64).reshape(self._count, 2)
        return self._timestamps[np.asarray(index)]

    def get_avg_fps(self) -> float:
        if self._fps is None:
            self._fps = float(self._reader.get_avg_fps() or 0.0)
        return self._fps

    def rewind(self) -> None:
        """Seek back to frame 0, which empties decord's decoder queues (``Seek`` clears them).
        Kept between windows without this, a reader's decoder thread went on filling its frame
        queue while the process waited for the next window: 1-4 GB per decode worker within
        minutes on a 60-minute 25 fps clip. After it, the next window starts from where a fresh
        reader starts."""
        self._reader.seek(0)


#: decord's message for a file whose header gives neither a frame count nor a duration
NO_DURATION = "Failed to measure duration/frame-count"


def remux_video_stream(src: str, dst) -> None:
    """Copy the first video stream of ``src`` (packets unchanged, no decoding) into the Matroska
    file or file object ``dst``; the muxer writes the duration that a live-written file lacks."""
    import av

    with av.open(str(src)) as source:
        if not source.streams.video:
            raise ValueError(f"{src}: no video stream")
        stream = source.streams.video[0]
        with av.open(dst, mode="w", format="matroska") as out:
            copy = out.add_stream_from_template(stream)
            for packet in source.demux(stream):
                if packet.size == 0:  # the flush packet at the end
                    continue
                packet.stream = copy
                out.mux(packet)


class TemporaryCopy:
    """A remuxed copy of a video's stream (:func:`remux_video_stream`) in the temporary folder,
    removed by :meth:`close`; on Linux it is unlinked at once and read as ``/proc/self/fd/N``, so
    nothing is left behind even when the process is killed."""

    def __init__(self, src: str):
        import tempfile

        fd, name = tempfile.mkstemp(prefix="avel-remux-", suffix=".mkv")
        self._fd = fd
        self._name: str | None = name
        try:
            with open(name, "wb") as fh:
                remux_video_stream(src, fh)
            proc = f"/proc/self/fd/{fd}"
            if os.path.exists(proc):
                os.unlink(name)
                self._name, self.path = None, proc
            else:
                self.path = name
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._name is not None:
            try:
                os.unlink(self._name)
            except OSError:
                pass
            self._name = None
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None


def file_identity(path: str) -> tuple[int, int, int, int]:
    """(device, inode, size, modification time in ns): a reader kept for another identity is stale."""
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class OpenVideo:
    """The readers of one video file, opened when first needed: :meth:`frames` (decord) and
    :meth:`audio` (:class:`AudioStream`)."""

    def __init__(self, path: str):
        self.path = str(path)
        self.identity = file_identity(self.path)
        self._frames: CachedFrames | None = None
        self._audio: AudioStream | None = None
        self.audio_opens = 0
        #: the file has no audio stream (found once, not looked for again)
        self.no_audio = False
        self._copy: TemporaryCopy | None = None
        #: the video stream's timing (:func:`extract.decode.stream_timing`), read once for recipes
        #: with the reference's frame-count rule
        self.timing = None

    def frames(self, open_reader) -> CachedFrames:
        """The video reader; ``open_reader(path)`` makes a decord ``VideoReader`` the first time.

        A file whose header gives neither a frame count nor a duration (Matroska/WebM written
        live, e.g. by a browser's MediaRecorder) is refused by decord ("Failed to measure
        duration/frame-count"); its video stream is then copied, packet for packet, into a
        temporary Matroska file that has them (:func:`remux_video_stream`), and decord reads that
        copy: the same packets, so the same frames and timestamps. The copy lives as long as
        this entry (on Linux it is unlinked at once and read through ``/proc/self/fd``)."""
        if self._frames is None:
            try:
                reader = open_reader(self.path)
            except Exception as exc:  # noqa: BLE001 - decord's DECORDError
                if NO_DURATION not in str(exc):
                    raise
                log.info("%s: no duration or frame count in the header; decoding a remuxed copy", self.path)
                self._copy = TemporaryCopy(self.path)
                reader = open_reader(self._copy.path)
            self._frames = CachedFrames(reader)
        return self._frames

    def audio(self, reopen: bool = False) -> AudioStream:
        """The audio stream (opened the first time, or again from the file's start with
        ``reopen``). Raises like :class:`AudioStream`."""
        if reopen:
            self.drop_audio()
        if self._audio is None:
            self._audio = AudioStream(self.path)
            self.audio_opens += 1
        return self._audio

    def rest(self) -> None:
        """Leave the readers idle until the next window (:meth:`CachedFrames.rewind`)."""
        if self._frames is not None:
            self._frames.rewind()

    def drop_audio(self) -> None:
        if self._audio is not None:
            self._audio.close()
            self._audio = None

    def close(self) -> None:
        self.drop_audio()
        self._frames = None  # decord frees its reader when the object goes
        if self._copy is not None:
            self._copy.close()
            self._copy = None


class Sources:
    """The :class:`OpenVideo` entries a process keeps between windows (least recently used first
    out, at most ``capacity``). :meth:`take` hands an entry out (or a new one), :meth:`give_back`
    keeps it for the next window; an entry given to a thread is not in the cache meanwhile."""

    def __init__(self, capacity: int = KEEP_OPEN):
        self.capacity = int(capacity)
        self._lock = threading.Lock()
        self._kept: collections.OrderedDict[str, OpenVideo] = collections.OrderedDict()

    def take(self, path: str) -> OpenVideo:
        path = str(path)
        with self._lock:
            entry = self._kept.pop(path, None)
        if entry is not None:
            try:
                same = entry.identity == file_identity(path)
            except OSError:
                same = False
            if same:
                return entry
            entry.close()
        return OpenVideo(path)

    def give_back(self, entry: OpenVideo) -> None:
        if self.capacity <= 0:
            entry.close()
            return
        try:
            entry.rest()
        except Exception:  # noqa: BLE001 - a reader that cannot even seek is not kept
            entry.close()
            return
        with self._lock:
            old = self._kept.pop(entry.path, None)
            self._kept[entry.path] = entry
            evicted = []
            while len(self._kept) > self.capacity:
                evicted.append(self._kept.popitem(last=False)[1])
        for item in ([old] if old is not None and old is not entry else []) + evicted:
            item.close()

    def clear(self) -> None:
        with self._lock:
            entries = list(self._kept.values())
            self._kept.clear()
        for entry in entries:
            entry.close()

    def __len__(self) -> int:
        return len(self._kept)


#: this process's open videos (decode workers, Dask workers, the parent in tests)
SOURCES = Sources()
