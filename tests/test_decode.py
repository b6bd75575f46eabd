"""Decoding (extract.decode): frame sampling on generated clips, audio, bad inputs, the killable pool."""
from __future__ import annotations

import math
import os
import time

import numpy as np
import pytest

from extract.decode import DecodeError, DecodePool, Failure, VideoRequest, decode_video, plan_frames
from extract.extractors import FrameGrid
from extract.factories.media import encode_audio, write_clip

FPS = 10
SIZE = 64


def level_of(index: int) -> int:
    """Grey level of generated frame ``index`` (distinct, far apart, survives H.264)."""
    return 6 * index + 4


def identity_prepare(frames: np.ndarray) -> np.ndarray:
    return np.asarray(frames)


def grid(per_segment: int = 4) -> FrameGrid:
    return FrameGrid(per_segment=per_segment, prepare=identity_prepare, name=f"id{per_segment}")


def write_indexed_clip(path, seconds: float, fps: int = FPS, audio=None, sample_rate=16000):
    """A clip whose frame k is a flat grey image of level_of(k)."""
    count = int(round(seconds * fps))
    frames = np.stack([np.full((SIZE, SIZE, 3), level_of(k), np.uint8) for k in range(count)])
    return write_clip(path, frames, fps=fps, audio=audio, sample_rate=sample_rate)


def expected_index(time_s: float, fps: float, count: int) -> int:
    """Nearest frame of a constant-rate stream (frame k at k/fps), ties to the earlier frame."""
    return int(min(count - 1, max(0, math.ceil(time_s * fps - 0.5))))


def tone(seconds: float, rate: int, freq: float, amp: float = 0.3) -> np.ndarray:
    """A linear chirp from ``freq`` to ``4 freq`` over the clip (so alignment is unambiguous)."""
    t = np.arange(int(seconds * rate)) / rate
    phase = 2 * np.pi * (freq * t + 1.5 * freq * t**2 / seconds)
    return (amp * np.sin(phase)).astype(np.float32)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    out = {
        "full": write_indexed_clip(root / "full.mp4", 4.0, audio=tone(4.0, 16000, 440.0)),
        "short": write_indexed_clip(root / "short.mp4", 2.5, audio=tone(2.5, 16000, 440.0)),
        "silent": write_indexed_clip(root / "silent.mp4", 3.0),
    }
    six = np.stack([tone(3.0, 48000, 440.0, amp=0.05 * (c + 1)) for c in range(6)])
    out["six"] = write_indexed_clip(root / "six.mp4", 3.0, audio=six, sample_rate=48000)
    out["low"] = write_indexed_clip(root / "low.mp4", 3.0, audio=tone(3.0, 8000, 440.0), sample_rate=8000)
    (root / "empty.mp4").write_bytes(b"")
    (root / "text.mp4").write_text("this is not a video\n" * 50)
    out["empty"], out["text"] = root / "empty.mp4", root / "text.mp4"
    return out


def test_plan_frames_follows_the_nearest_pts_rule():
    pts = np.arange(25) / FPS  # 2.5 s at 10 fps
    index, valid = plan_frames(pts, per_segment=4, segments=3)
    times = np.arange(3)[:, None] + (np.arange(4)[None, :] + 0.5) / 4
    want = np.vectorize(lambda t: expected_index(t, FPS, 25))(times)
    np.testing.assert_array_equal(index, want)
    # the last frame is shown until 2.5 s: times 2.125 and 2.375 are inside, 2.625 and 2.875 are not
    np.testing.assert_array_equal(valid, [[True] * 4, [True] * 4, [True, True, False, False]])
    # a window of 1.5 s starting at 0.5 s: times at or after 2.0 s are outside the window
    index, valid = plan_frames(pts, per_segment=2, segments=2, start=0.5, duration=1.5)
    np.testing.assert_array_equal(index, [[7, 12], [17, 22]])
    np.testing.assert_array_equal(valid, [[True, True], [True, False]])


def test_decoded_frames_are_the_nearest_frames(clips):
    video = decode_video(VideoRequest("full", str(clips["full"])), [grid(4)], segments=4, audio=False)
    frames, valid = video.frames["id4"], video.frame_valid["id4"]
    assert frames.shape == (4, 4, SIZE, SIZE, 3) and valid.all()
    times = np.arange(4)[:, None] + (np.arange(4)[None, :] + 0.5) / 4
    want = np.vectorize(lambda t: level_of(expected_index(t, FPS, 40)))(times)
    got = frames.reshape(4, 4, -1).mean(axis=-1)
    assert np.abs(got - want).max() <= 3, (got, want)
    assert video.audio is None and video.info["frames"] == 40 and video.info["fps"] == pytest.approx(10)


def test_window_start_and_two_grids_share_one_decode(clips):
    request = VideoRequest("full@1+2", str(clips["full"]), start=1.0, duration=2.0)
    video = decode_video(request, [grid(2), grid(4)], segments=3, audio=True)
    assert set(video.frames) == {"id2", "id4"}
    times2 = 1.0 + np.arange(3)[:, None] + (np.arange(2)[None, :] + 0.5) / 2
    want = np.vectorize(lambda t: level_of(expected_index(t, FPS, 40)))(times2)
    got = video.frames["id2"].reshape(3, 2, -1).mean(-1)
    assert np.abs(got - want)[:2].max() <= 3
    # the window ends at 3.0 s: its third second is invalid even though the file goes on
    np.testing.assert_array_equal(video.frame_valid["id2"], [[True, True], [True, True], [False, False]])
    assert (video.frames["id2"][2] == 0).all()
    # audio cut to the window: 2 s at 16 kHz
    assert video.audio.shape == (32000,)


def _aligned_error(got: np.ndarray, ref: np.ndarray) -> tuple[int, float]:
    """(lag of ``got`` behind ``ref`` in samples by cross-correlation, relative rms error at that lag)."""
    n = min(len(got), len(ref))
    corr = np.fft.irfft(np.fft.rfft(got[:n], 2 * n) * np.conj(np.fft.rfft(ref[:n], 2 * n)))
    lag = int(np.argmax(corr))
    lag = lag if lag < n else lag - 2 * n
    a, b = (got[lag:n], ref[: n - lag]) if lag >= 0 else (got[: n + lag], ref[-lag:n])
    edge = 400  # leave out the first and last 25 ms (codec and filter edges)
    a, b = a[edge:-edge], b[edge:-edge]
    return lag, float(np.sqrt(np.mean((a - b) ** 2)) / np.sqrt(np.mean(b**2)))


def pyav_reference_16k(path, seconds: float) -> np.ndarray:
    """Independent reference: PyAV decode, mean of the channels, scipy polyphase resampling to 16 kHz."""
    import av
    from scipy.signal import resample_poly

    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        rate = stream.rate
        planes = np.concatenate([frame.to_ndarray() for frame in container.decode(stream)], axis=1)
    mono = planes.astype(np.float64).mean(axis=0)
    g = math.gcd(16000, rate)
    return resample_poly(mono, 16000 // g, rate // g)[: int(seconds * 16000)]


@pytest.mark.parametrize("name, rate, channels", [("full", 16000, 1), ("six", 48000, 6), ("low", 8000, 1)])
def test_audio_is_mono_16k_like_an_independent_decode(clips, name, rate, channels):
    video = decode_video(VideoRequest(name, str(clips[name])), [grid(2)], segments=3, audio=True)
    assert video.info["audio_rate"] == rate and video.info["audio_channels"] == channels
    assert video.info["audio_resampler"] == "kaiser_best"
    assert video.audio.dtype == np.float32 and video.audio.shape == (48000,)
    ref = pyav_reference_16k(clips[name], 3.0)
    lag, err = _aligned_error(video.audio, ref)
    assert lag == 0
    assert err < 0.01, err  # kaiser_best vs scipy's polyphase filter


def test_audio_is_aligned_with_the_written_signal(clips):
    video = decode_video(VideoRequest("full", str(clips["full"])), [grid(2)], segments=3, audio=True)
    ref = tone(4.0, 16000, 440.0)[:48000]
    lag, err = _aligned_error(video.audio, ref)
    # write_clip's AAC encoder puts 1024 priming samples before the signal without an edit list,
    # so the decoded audio lags by exactly that; nothing else may shift it
    assert lag == 1024
    assert err < 0.05, err  # AAC at the default bitrate


def test_short_video_and_missing_audio(clips):
    short = decode_video(VideoRequest("short", str(clips["short"])), [grid(4)], segments=4, audio=True)
    np.testing.assert_array_equal(short.frame_valid["id4"].sum(axis=1), [4, 4, 2, 0])
    # 2.5 s at 16 kHz + 1024 priming samples, padded by AAC to whole 1024-sample frames
    assert short.audio.shape[0] == 1024 * math.ceil((40000 + 1024) / 1024)
    silent = decode_video(VideoRequest("silent", str(clips["silent"])), [grid(4)], segments=4, audio=True)
    assert silent.audio is None and silent.info["audio_error"] == "no audio stream"
    np.testing.assert_array_equal(silent.frame_valid["id4"].sum(axis=1), [4, 4, 4, 0])


@pytest.mark.parametrize("name, message", [("missing", "file not found"), ("empty", "empty file"), ("text", "cannot open video")])
def test_unusable_files_raise_with_a_reason(clips, tmp_path, name, message):
    path = tmp_path / "nope.mp4" if name == "missing" else clips[name]
    with pytest.raises(DecodeError, match=message):
        decode_video(VideoRequest(name, str(path)), [grid(2)], segments=2)


# ------------------------------------------------------------------------------------------
# the pool (task functions must be module-level to be picklable)


def echo_or_hang(value, pid_file):
    """Returns ``value``; hangs (like decord on a broken file) when value == "hang"."""
    if value == "hang":
        with open(pid_file, "w") as fh:
            fh.write(str(os.getpid()))
        time.sleep(3600)
    if value == "crash":
        os._exit(3)
    if value == "raise":
        raise DecodeError("broken on purpose")
    return value, os.getpid()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_pool_kills_a_hung_worker_and_goes_on(tmp_path):
    pid_file = str(tmp_path / "hung.pid")
    tasks = [(v, pid_file) for v in ["a", "hang", "b", "c", "raise", "crash", "d"]]
    started = time.monotonic()
    # generous timeout: the first task of a worker also imports this test module there
    with DecodePool(2, timeout_s=6, ahead=3) as pool:
        results = list(pool.imap(echo_or_hang, tasks))
        assert pool.killed == 1 and pool.crashed == 1
        assert len(pool.workers) == 2 and all(w.process.is_alive() for w in pool.workers)
    elapsed = time.monotonic() - started
    values = [r[0] if not isinstance(r, Failure) else r for r in results]
    assert values[0] == "a" and values[2:4] == ["b", "c"] and values[6] == "d"
    assert isinstance(values[1], Failure) and "timed out after 6 s" in values[1].reason
    assert isinstance(values[4], Failure) and values[4].reason == "broken on purpose"
    assert isinstance(values[5], Failure) and "exit code 3" in values[5].reason
    hung_pid = int(open(pid_file).read())
    assert not _alive(hung_pid), "the hung worker must be killed"
    assert elapsed < 60


def test_pool_keeps_order_and_bounds_read_ahead(tmp_path):
    tasks = [(i, str(tmp_path / "x")) for i in range(12)]
    with DecodePool(2, timeout_s=30, ahead=2) as pool:
        iterator = pool.imap(echo_or_hang, tasks)
        first = next(iterator)
        time.sleep(0.5)
        # nothing beyond the read-ahead window has been handed out
        assert sum(w.seq is not None for w in pool.workers) <= 2
        rest = list(iterator)
    assert [first[0]] + [r[0] for r in rest] == list(range(12))


def test_decode_video_runs_in_the_pool(clips):
    request = VideoRequest("full", str(clips["full"]))
    with DecodePool(1, timeout_s=60) as pool:
        (video,) = pool.imap(decode_video, [(request, [grid(2)], 2, True)])
    assert not isinstance(video, Failure), video
    direct = decode_video(request, [grid(2)], 2, True)
    np.testing.assert_array_equal(video.frames["id2"], direct.frames["id2"])
    np.testing.assert_array_equal(video.audio, direct.audio)


# ------------------------------------------------------------------------------------------
# the native audio rate (PyAV, no fd redirection) and the unusable-rate path


def write_two_audio_streams(path, seconds: float = 2.0):
    """Video + AAC 8 kHz mono (stream #1, not marked default) + AAC 48 kHz stereo (stream #2,
    default, higher bitrate): FFmpeg's av_find_best_stream picks #2, decord decodes #1."""
    import av

    container = av.open(str(path), mode="w")
    try:
        video = container.add_stream("libx264", rate=FPS)
        video.height = video.width = SIZE
        video.pix_fmt = "yuv420p"
        first = container.add_stream("aac", rate=8000)
        first.layout, first.bit_rate = "mono", 24000
        second = container.add_stream("aac", rate=48000)
        second.layout, second.bit_rate = "stereo", 192000
        first.disposition = av.stream.Disposition(0)
        second.disposition = av.stream.Disposition.default
        for k in range(int(seconds * FPS)):
            image = np.full((SIZE, SIZE, 3), level_of(k), np.uint8)
            for packet in video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
        for stream, rate, channels in [(first, 8000, 1), (second, 48000, 2)]:
            wave = 0.3 * np.sin(2 * np.pi * 1000.0 * np.arange(int(seconds * rate)) / rate)
            encode_audio(container, stream, np.repeat(wave[None].astype(np.float32), channels, axis=0))
    finally:
        container.close()
    return path


def peak_hz(wave: np.ndarray, rate: int = 16000) -> float:
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return float(np.argmax(spectrum) * rate / len(wave))


def test_native_sample_rate_is_the_stream_rate(clips):
    from extract.sources import AudioStream, NoAudioStream

    for name, rate in [("six", 48000), ("low", 8000), ("full", 16000)]:
        stream = AudioStream(str(clips[name]))
        assert stream.rate == rate
        stream.close()
    with pytest.raises(NoAudioStream, match="no audio stream"):
        AudioStream(str(clips["silent"]))


def test_native_sample_rate_is_that_of_the_stream_decord_decodes(tmp_path):
    """With two audio streams decord decoded the first (not FFmpeg's "best"): so do we, at its rate."""
    import av

    from extract.decode import read_audio
    from extract.sources import AudioStream

    path = write_two_audio_streams(tmp_path / "two.mp4")
    with av.open(str(path)) as container:
        assert container.streams.best("audio").codec_context.sample_rate == 48000  # the trap
    stream = AudioStream(str(path))
    assert (stream.rate, stream.channels, stream.stream.index) == (8000, 1, 1)
    stream.close()
    wave, info = read_audio(str(path), 0.0, 2.0)
    assert info["audio_rate"] == 8000 and info["audio_channels"] == 1 and info["audio_resampler"] == "kaiser_best"
    assert wave.shape == (32000,)
    # a wrong rate would move the 1 kHz tone (e.g. to 167 Hz if 8 kHz data were taken for 48 kHz)
    assert abs(peak_hz(wave[2048:]) - 1000.0) < 2.0


def test_native_sample_rate_on_the_real_two_stream_clip(media_dir):
    from extract.decode import read_audio
    from extract.sources import AudioStream

    path = media_dir / "nasa_13013.mp4"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    stream = AudioStream(str(path))
    assert stream.rate == 8000  # stream #1; the "best" audio stream (#4) is 16 kHz
    stream.close()
    wave, info = read_audio(str(path), 0.0, 10.0)
    assert info["audio_rate"] == 8000 and info["audio_channels"] == 2 and wave.shape == (160000,)


def test_reading_the_rate_leaves_stdout_alone(tmp_path, capfd):
    """Another thread writing to file descriptor 1 while audio is read loses nothing (the old code
    pointed fd 1 of the whole process at a temporary file while decord printed its stream info,
    so lines written meanwhile by other threads vanished, or broke the parse of the rate)."""
    import threading

    from extract.decode import read_audio

    path = write_indexed_clip(tmp_path / "tiny.mp4", 0.2, audio=tone(0.2, 48000, 440.0), sample_rate=48000)
    capfd.readouterr()
    stop = threading.Event()
    written = []

    def writer():
        k = 0
        while not stop.is_set():
            os.write(1, f"line {k}\n".encode())
            written.append(k)
            k += 1
            time.sleep(1e-5)  # let the reading thread run; the writes keep coming while it is in C

    rates = []
    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for _ in range(60):
            wave, info = read_audio(str(path), 0.0, 0.1)
            rates.append((info.get("audio_rate"), info.get("audio_resampler"), None if wave is None else wave.shape))
    finally:
        stop.set()
        thread.join()
    out = capfd.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("line ")]
    assert len(written) > 100
    assert lines == [f"line {k}" for k in written], f"{len(written) - len(lines)} of {len(written)} lines lost"
    assert rates == [(48000, "kaiser_best", (1600,))] * 60


def test_no_file_descriptor_is_redirected(clips, monkeypatch):
    def forbidden(*args):
        raise AssertionError("process-wide file descriptor redirection")

    with monkeypatch.context() as patch:  # undone before pytest's own capture swaps descriptors again
        patch.setattr(os, "dup2", forbidden)
        patch.setattr(os, "dup", forbidden)
        video = decode_video(VideoRequest("six", str(clips["six"])), [grid(2)], segments=3, audio=True)
    assert video.info["audio_rate"] == 48000 and video.audio.shape == (48000,)


def test_unreadable_sample_rate_fails_the_window(clips, monkeypatch):
    """No decord fallback resampling and no silent visual-only row: an audio stream whose rate
    cannot be read fails the window with the reason (a failed row, retried by --retry-failed)."""
    import extract.sources as sources
    from extract.decode import read_audio

    class NoRate(sources.AudioStream):
        def __init__(self, path):
            raise sources.AudioDecodeError("audio stream #1 declares no sample rate (0)")

    monkeypatch.setattr(sources, "AudioStream", NoRate)
    sources.SOURCES.clear()
    with pytest.raises(DecodeError, match=r"^the audio stream cannot be decoded: audio stream #1 declares no sample rate \(0\)$"):
        read_audio(str(clips["six"]), 0.0, 3.0)
    with pytest.raises(DecodeError, match="declares no sample rate"):
        decode_video(VideoRequest("six", str(clips["six"])), [grid(2)], segments=3, audio=True)
    # without audio the same file decodes: only its audio is broken
    video = decode_video(VideoRequest("six", str(clips["six"])), [grid(2)], segments=3, audio=False)
    assert video.audio is None and video.frame_valid["id2"].all()
