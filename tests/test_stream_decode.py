"""Windows of one video share one forward pass (extract.sources): the same samples and frames as
the former per-window decode (decord's AudioReader on the whole file, a fresh VideoReader per
window), bounded memory, no re-reading; decode failures are failures."""
from __future__ import annotations

import math

import numpy as np
import pytest

from extract.decode import DecodeError, VideoRequest, decode_video, load_decord, read_frames
from extract.extractors import FrameGrid
from extract.factories.media import write_clip
from extract.sources import AudioStream, Sources

FPS = 10
SIZE = 64


def small(frames: np.ndarray) -> np.ndarray:
    return np.asarray(frames)[:, ::4, ::4]


GRIDS = [FrameGrid(per_segment=2, prepare=small, name="g2"), FrameGrid(per_segment=3, prepare=small, name="g3")]


# ------------------------------------------------------------------------------------------
# the former path, transcribed from extract/decode.py at commit b8fe0b3 (read_audio lines 241-279,
# decode_video lines 302-329): decord decodes the WHOLE first audio stream, the native rate
# comes from PyAV, the channels are averaged and the window [round(start r) - r/100,
# round((start + seconds) r) + r/100) is resampled and cut; every window opens a new VideoReader.


def former_read_audio(path: str, start: float, seconds: float):
    import av

    from extract.audio import SAMPLE_RATE, resample, to_mono

    decord = load_decord()
    try:
        reader = decord.AudioReader(path, ctx=decord.cpu(0), sample_rate=-1, mono=False)
    except Exception:  # noqa: BLE001
        return None
    samples = np.asarray(reader._array, dtype=np.float32)
    del reader
    if samples.size == 0:
        return None
    with av.open(path) as container:
        rate = int(container.streams.audio[0].codec_context.sample_rate)
    mono = to_mono(samples)
    first, last = int(round(start * rate)), int(round((start + seconds) * rate))
    pad = int(rate // 100)
    lo = max(0, first - pad)
    piece = resample(mono[lo: last + pad], rate, SAMPLE_RATE)
    offset = int(round((first - lo) * SAMPLE_RATE / rate))
    return np.ascontiguousarray(piece[offset: offset + int(round(seconds * SAMPLE_RATE))], dtype=np.float32)


def former_decode(path: str, start: float, segments: int):
    decord = load_decord()
    reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
    frames, valid, _ = read_frames(reader, GRIDS, segments, start, float(segments))
    return frames, valid, former_read_audio(path, start, float(segments))


def assert_same_window(video, former, where: str) -> None:
    frames, valid, wave = former
    for name in frames:
        np.testing.assert_array_equal(video.frame_valid[name], valid[name], err_msg=where)
        assert np.array_equal(video.frames[name], frames[name]), f"{where}: frames of {name} differ"
    if wave is None:
        assert video.audio is None, where
    else:
        assert video.audio is not None and video.audio.shape == wave.shape, (where, None if video.audio is None else video.audio.shape, wave.shape)
        assert np.array_equal(video.audio, wave), f"{where}: audio differs (max {np.abs(video.audio - wave).max()})"


def decode_windows(path, starts, segments, sources_per_window):
    """decode_video of each window with the Sources object given for it (as worker processes)."""
    import extract.sources as sources

    saved = sources.SOURCES
    out = []
    try:
        for start, src in zip(starts, sources_per_window):
            sources.SOURCES = src
            out.append(decode_video(VideoRequest(f"w{start}", str(path), start=float(start), duration=float(segments)),
                                    GRIDS, segments, audio=True))
    finally:
        sources.SOURCES = saved
    return out


def chirp(seconds: float, rate: int, channels: int, seed: int = 0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(seed)
    base = 0.3 * np.sin(2 * np.pi * (200 * t + 300 * t ** 2 / seconds))
    return np.stack([np.roll(base, 100 * c) + 0.01 * rng.standard_normal(t.size) for c in range(channels)]).astype(np.float32)


def moving_frames(seconds: float) -> np.ndarray:
    count = int(seconds * FPS)
    frames = np.zeros((count, SIZE, SIZE, 3), np.uint8)
    for k in range(count):
        frames[k, :, :, 0] = (7 * k) % 256
        frames[k, (k % 8) * 8:(k % 8) * 8 + 8, :, 1] = 255
    return frames


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory):
    """34 s of 48 kHz stereo AAC with video: windows 0, 10, 20, 30 (the last partial)."""
    path = tmp_path_factory.mktemp("long") / "long.mp4"
    return write_clip(path, moving_frames(34.0), fps=FPS, audio=chirp(34.0, 48000, 2), sample_rate=48000)


# ------------------------------------------------------------------------------------------
# equal to the former path


@pytest.mark.parametrize("order", ["one worker", "two workers"])
def test_windows_equal_the_former_decode_on_a_generated_long_clip(long_clip, order):
    starts = [0, 10, 20, 30]
    a, b = Sources(), Sources()
    sources = [a] * 4 if order == "one worker" else [a, b, a, b]
    videos = decode_windows(long_clip, starts, 10, sources)
    for start, video in zip(starts, videos):
        assert_same_window(video, former_decode(str(long_clip), float(start), 10), f"{long_clip.name}@{start}")
    # the last window is partial: 4 s of audio and frames, the rest invalid
    assert videos[-1].frame_valid["g2"].sum(axis=1).tolist() == [2, 2, 2, 2, 0, 0, 0, 0, 0, 0]
    # each "worker" opened the audio stream and the video once for all its windows
    for src in {id(s): s for s in sources}.values():
        (entry,) = src._kept.values()
        assert entry.audio_opens == 1


REAL_CLIPS = ["v_GGSY1Qvo990.mp4", "v_ZNVhz7ctTq0.mp4", "nasa_13013.mp4", "big_buck_bunny_small.mp4",
              "flipping_a_pancake.mkv"]


@pytest.mark.parametrize("name", REAL_CLIPS)
def test_windows_of_real_clips_equal_the_former_decode(media_dir, name):
    """AAC 44.1 kHz mono (two clips), AAC 8 kHz stereo with two audio streams, AAC 48 kHz 5.1
    with an edit list, Opus 48 kHz in Matroska (pre-skip): first, middle and last 4-s windows,
    decoded one after the other as one worker does, and alternately by two."""
    import av

    path = media_dir / name
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    with av.open(str(path)) as container:
        duration = container.duration / 1e6
    starts = list(range(0, int(math.ceil(duration - 0.25)), 4))
    picked = sorted({starts[0], starts[len(starts) // 2], starts[-1]})
    for sources in ([Sources()] * len(picked), [Sources(), Sources()] * len(picked)):
        videos = decode_windows(path, picked, 4, sources)
        for start, video in zip(picked, videos):
            assert_same_window(video, former_decode(str(path), float(start), 4), f"{name}@{start}")


@pytest.mark.parametrize("codec, rate, channels", [("pcm_s16le", 44100, 2), ("pcm_s24le", 48000, 1), ("pcm_u8", 8000, 1),
                                                   ("pcm_f64le", 22050, 2), ("libopus", 48000, 2),
                                                   ("mp2", 44100, 2)])
def test_every_sample_format_converts_as_decord_did(tmp_path, codec, rate, channels):
    """Integer, packed and double formats become float planar as libswresample made them for decord."""
    from extract.decode import read_audio

    path = tmp_path / f"a.{'mkv'}"
    try:
        write_clip(path, moving_frames(3.0), fps=FPS, audio=chirp(3.0, rate, channels, seed=1), sample_rate=rate,
                   audio_codec=codec)
    except Exception as exc:  # noqa: BLE001 - an encoder missing from this PyAV build
        pytest.skip(f"cannot write {codec}: {exc}")
    for start in (0.0, 1.0):
        wave, info = read_audio(str(path), start, 1.5)
        want = former_read_audio(str(path), start, 1.5)
        assert info["audio_rate"] == rate and info["audio_channels"] == channels
        assert wave.shape == want.shape and np.array_equal(wave, want), (codec, start)


def test_a_window_before_the_stream_position_reopens_and_stays_equal(long_clip):
    src = Sources()
    videos = decode_windows(long_clip, [20, 0], 10, [src, src])
    assert_same_window(videos[1], former_decode(str(long_clip), 0.0, 10), "backwards")
    (entry,) = src._kept.values()
    assert entry.audio_opens == 2


# ------------------------------------------------------------------------------------------
# bounded work and memory


def test_a_window_reads_only_up_to_its_end_and_keeps_one_window(long_clip):
    rate, channels, frame = 48000, 2, 1024
    stream = AudioStream(str(long_clip))
    kept = []
    for start in (0, 10, 20, 30):
        lo, hi = max(0, start * rate - rate // 100), (start + 10) * rate + rate // 100
        samples = stream.read(lo, hi)
        # decoded up to the window's end (plus at most one frame), not further
        assert hi <= stream.decoded <= hi + frame or stream.ended
        kept.append(stream.bytes_kept)
        assert samples.shape[0] == channels
    stream.close()
    limit = (10 * rate + 2 * (rate // 100) + 2 * frame) * channels * 4
    assert max(kept) <= limit, (kept, limit)
    # the whole 34 s would be 13 MB; one window is about 3.9 MB
    assert max(kept) < 34 * rate * channels * 4 / 3


def test_sources_keep_at_most_their_capacity_and_drop_changed_files(tmp_path, long_clip):
    import shutil

    src = Sources(capacity=1)
    other = shutil.copy(long_clip, tmp_path / "other.mp4")
    first = src.take(str(long_clip))
    src.give_back(first)
    second = src.take(str(other))
    src.give_back(second)
    assert len(src) == 1 and src.take(str(long_clip)) is not first  # evicted
    src.give_back(second)
    # a file rewritten in place (another size / mtime) is opened again
    write_clip(other, moving_frames(2.0), fps=FPS, audio=chirp(2.0, 16000, 1), sample_rate=16000)
    assert src.take(str(other)) is not second


# ------------------------------------------------------------------------------------------
# decode failures are failures


def corrupt_audio_packets(src, dst, stride: int = 3) -> int:
    """Copy ``src`` to ``dst`` with the payload of every ``stride``-th AAC packet after the
    first second overwritten with bytes that are not AAC; returns how many were damaged."""
    import av

    data = bytearray(src.read_bytes())
    damaged = 0
    with av.open(str(src)) as container:
        stream = container.streams.audio[0]
        for k, packet in enumerate(container.demux(stream)):
            if packet.pos is None or packet.pos < 0 or packet.size < 16 or packet.pts is None:
                continue
            if packet.pts * stream.time_base < 1.0 or k % stride:
                continue
            data[packet.pos: packet.pos + packet.size] = bytes((i * 37 + 11) % 256 for i in range(packet.size))
            damaged += 1
    dst.write_bytes(bytes(data))
    return damaged


def test_corrupted_audio_packets_fail_the_window_with_the_reason(tmp_path):
    import av

    good = write_clip(tmp_path / "good.mp4", moving_frames(4.0), fps=FPS, audio=chirp(4.0, 44100, 2), sample_rate=44100)
    bad = tmp_path / "bad.mp4"
    assert corrupt_audio_packets(good, bad) > 10
    # the container still opens and its video decodes, frame for frame as the intact file's
    with av.open(str(bad)) as container:
        assert container.streams.audio and container.streams.video
    intact = decode_video(VideoRequest("good", str(good)), GRIDS, 4, audio=False)
    video_only = decode_video(VideoRequest("bad", str(bad)), GRIDS, 4, audio=False)
    for name in intact.frames:
        assert np.array_equal(intact.frames[name], video_only.frames[name])
    with pytest.raises(DecodeError, match=r"^the audio stream cannot be decoded: audio decoding failed after \d+ samples"):
        decode_video(VideoRequest("bad", str(bad)), GRIDS, 4, audio=True)
    # the former path made this a done row: decord stops at the first error and returns what it had
    assert former_read_audio(str(bad), 0.0, 4.0) is not None


def test_a_file_without_audio_or_with_an_empty_stream_is_visual_only(tmp_path):
    import av

    from extract.decode import read_audio

    silent = write_clip(tmp_path / "silent.mp4", moving_frames(2.0), fps=FPS)
    wave, info = read_audio(str(silent), 0.0, 2.0)
    assert wave is None and info == {"audio_error": "no audio stream"}
    empty = tmp_path / "empty-audio.mkv"
    with av.open(str(empty), mode="w") as container:  # an audio stream with no packet at all
        video = container.add_stream("libx264", rate=FPS)
        video.width = video.height = SIZE
        video.pix_fmt = "yuv420p"
        audio = container.add_stream("aac", rate=16000)
        audio.layout = "mono"
        for image in moving_frames(2.0):
            for packet in video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
    with av.open(str(empty)) as container:
        assert len(container.streams.audio) == 1
    wave, info = read_audio(str(empty), 0.0, 2.0)
    assert wave is None and info == {"audio_error": "audio stream is empty"}
    video = decode_video(VideoRequest("empty", str(empty)), GRIDS, 2, audio=True)
    assert video.audio is None and video.frame_valid["g2"].all()


# ------------------------------------------------------------------------------------------
# Matroska / WebM without a duration in the header (written live, as browsers record)


def write_live(path, fmt: str, video_codec: str, audio_codec: str, seconds: float = 12.0, rate: int = 48000):
    """Video + mono audio, muxed in time order with the muxer's ``live`` option: no Duration, no Cues."""
    import av

    container = av.open(str(path), mode="w", format=fmt, options={"live": "1"})
    try:
        video = container.add_stream(video_codec, rate=FPS)
        video.width = video.height = SIZE
        video.pix_fmt = "yuv420p"
        audio = container.add_stream(audio_codec, rate=rate)
        audio.layout = "mono"
        frames, wave = moving_frames(seconds), chirp(seconds, rate, 1)[0]
        step, k, lo = 960, 0, 0
        while k < len(frames) or lo < wave.size:
            if k < len(frames) and (lo >= wave.size or k / FPS <= lo / rate):
                for packet in video.encode(av.VideoFrame.from_ndarray(frames[k], format="rgb24")):
                    container.mux(packet)
                k += 1
            else:
                fmt_name = audio.codec_context.codec.audio_formats[0].name
                chunk = np.ascontiguousarray(wave[None, lo:lo + step])
                frame = av.AudioFrame.from_ndarray(chunk if fmt_name in ("flt", "fltp") else (chunk * 32767).astype(np.int16),
                                                   format=fmt_name if fmt_name in ("flt", "fltp") else "s16", layout="mono")
                frame.sample_rate = rate
                for packet in audio.encode(frame):
                    container.mux(packet)
                lo += step
        for stream in (video, audio):
            for packet in stream.encode():
                container.mux(packet)
    finally:
        container.close()
    return path


@pytest.mark.parametrize("fmt, video_codec, audio_codec, ext", [("matroska", "libx264", "aac", "mkv"),
                                                                  ("webm", "libvpx", "libopus", "webm")])
def test_a_video_without_a_duration_is_probed_and_decoded(tmp_path, fmt, video_codec, audio_codec, ext):
    import glob
    import tempfile

    import av

    from train.predict.run import probe_duration, window_starts

    path = write_live(tmp_path / f"live.{ext}", fmt, video_codec, audio_codec)
    with av.open(str(path)) as container:  # the trap: no duration anywhere in the header
        assert container.duration is None and all(not s.duration and not s.frames for s in container.streams)
        reference = [(float(f.pts * f.time_base), f.to_ndarray(format="rgb24")) for f in container.decode(video=0)]
    assert len(reference) == 120
    assert probe_duration(path) == pytest.approx(12.0, abs=0.05)
    assert window_starts(probe_duration(path), 10) == [0, 10]

    leftovers = set(glob.glob(f"{tempfile.gettempdir()}/avel-remux-*"))
    grid = FrameGrid(per_segment=2, prepare=lambda f: np.asarray(f), name="raw")
    src = Sources()
    import extract.sources as sources

    saved, sources.SOURCES = sources.SOURCES, src
    try:
        videos = [decode_video(VideoRequest(f"live@{s}", str(path), float(s), 10.0), [grid], 10, audio=True) for s in (0, 10)]
    finally:
        sources.SOURCES = saved
    pts = np.array([t for t, _ in reference])
    for start, video in zip((0, 10), videos):
        times = start + np.arange(10)[:, None] + (np.arange(2)[None, :] + 0.5) / 2
        valid = video.frame_valid["raw"]
        assert valid.sum() == (20 if start == 0 else 4)
        for t, f in zip(*np.nonzero(valid)):
            want = reference[int(np.argmin(np.abs(pts - times[t, f]) + 1e-9 * pts))][1]
            assert np.array_equal(video.frames["raw"][t, f], want), (start, t, f)
        assert video.audio is not None and video.info["audio_rate"] == 48000
    # the last window: 2 s of audio (plus the codec's priming and padding, < 0.1 s)
    assert videos[0].audio.shape == (160000,) and 32000 <= videos[1].audio.shape[0] <= 33600
    src.clear()
    assert set(glob.glob(f"{tempfile.gettempdir()}/avel-remux-*")) == leftovers  # no copy left behind


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/statm"), reason="reads /proc/self/statm")
def test_a_kept_reader_does_not_fill_memory_while_it_waits(tmp_path):
    """decord's decoder thread goes on decoding a kept reader's queued packets into frames while
    the worker waits for its next window (measured: +650 MB after one window of a 2-minute 320x240
    clip, the whole rest of the file; 4 GB per worker within minutes on 60 minutes). Sources
    rewind the reader (decord's seek clears its queues) when a window is done."""
    import time

    import extract.sources as sources

    def rss_mb() -> float:
        return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2 ** 20

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (24 * 30, 240, 320, 3), dtype=np.uint8)  # 30 s at 24 fps: 760 frames, 175 MB as RGB
    path = write_clip(tmp_path / "idle.mp4", frames, fps=24, crf=40)
    del frames
    grid = FrameGrid(per_segment=1, prepare=lambda f: np.asarray(f)[:, ::8, ::8], name="tiny")
    src = Sources()
    saved, sources.SOURCES = sources.SOURCES, src
    try:
        decode_video(VideoRequest("w0", str(path), 0.0, 10.0), [grid], 10, audio=False)  # warm-up (imports, allocator)
        src.clear()
        before = rss_mb()
        decode_video(VideoRequest("w0", str(path), 0.0, 10.0), [grid], 10, audio=False)
        time.sleep(1.5)  # the worker waits for its next window
        grown = rss_mb() - before
        assert len(src) == 1  # the reader is kept ...
        assert grown < 60, f"{grown:.0f} MB more after one window and a pause"  # ... without decoding the rest
    finally:
        sources.SOURCES = saved
        src.clear()
