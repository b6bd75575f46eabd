"""Visual outputs of avel-predict (train/predict/plots.py): frames read back with stage 1's decoder, attention
grids, timelines, attention and sounding-object strips, the overlay video — checked by values on
generated clips whose frames have known colours."""
from __future__ import annotations

import math

import numpy as np
import pytest

from extract.factories.media import write_clip
from train.predict import plots as pp

FPS = 10
SIZE = 64
#: one colour per second of the generated clips (far apart, survive H.264 + yuv420p)
PALETTE = np.array([(220, 30, 30), (30, 200, 40), (40, 60, 220), (230, 220, 40), (200, 40, 210), (40, 210, 210)],
                   np.uint8)


def colour_clip(path, seconds: int = 4, fps: int = FPS, audio: bool = False):
    """Second k of the clip is a flat image of PALETTE[k]."""
    frames = np.stack([np.broadcast_to(PALETTE[k // fps], (SIZE, SIZE + 16, 3)) for k in range(seconds * fps)])
    wave = (0.2 * np.sin(2 * np.pi * 440 * np.arange(seconds * 16000) / 16000)).astype(np.float32) if audio else None
    return write_clip(path, frames, fps=fps, audio=wave, sample_rate=16000)


def grey_clip(path, count: int, fps: int, gop: int):
    """Frame k a flat grey of level 6k + 4, keyframe every ``gop`` frames (so seeking is real).
    64 x 64: decord (the decoder of the features and the pictures) cannot copy out frames 32 pixels
    wide (``DECORDArrayCopyFromTo: The size must exactly match``)."""
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        stream.options = {"crf": "10", "preset": "veryfast", "g": str(gop), "keyint_min": str(gop)}
        for k in range(count):
            frame = av.VideoFrame.from_ndarray(np.full((64, 64, 3), 6 * k + 4, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    if "libx264" not in __import__("av").codecs_available:
        pytest.skip("PyAV's FFmpeg has no libx264 encoder: the test clips cannot be written")
    root = tmp_path_factory.mktemp("predict_plots")
    (root / "text.mp4").write_text("this is not a video\n" * 50)
    return {
        "colour": colour_clip(root / "colour.mp4", seconds=4),
        "audio": colour_clip(root / "audio.mp4", seconds=3, audio=True),
        "audio_only": write_clip(root / "audio_only.m4a", None, audio=np.zeros(16000, np.float32), sample_rate=16000),
        "grey": grey_clip(root / "grey.mp4", count=40, fps=2, gop=4),
        "text": root / "text.mp4",
        "root": root,
    }


def nearest_palette(pixel: np.ndarray) -> int:
    return int(np.argmin(np.abs(PALETTE.astype(int) - np.asarray(pixel, int)).sum(axis=1)))


def png_size(path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as image:
        return image.size  # (width, height)


# ---------------------------------------------------------------------------------------------
# read_frames


def test_read_frames_returns_each_seconds_colour(clips):
    times = [0.5, 1.5, 2.5, 3.5]
    frames = pp.read_frames(clips["colour"], times)
    assert frames.shape == (4, 224, 224, 3) and frames.dtype == np.uint8
    for k in range(4):
        assert nearest_palette(frames[k].reshape(-1, 3).mean(axis=0)) == k
        assert np.abs(frames[k].astype(int) - PALETTE[k].astype(int)).mean() < 12


def test_read_frames_unsorted_repeated_and_beyond_the_end(clips):
    frames = pp.read_frames(clips["colour"], [2.5, 0.5, 9.0, 0.5, 3.95], size=32)
    assert frames.shape == (5, 32, 32, 3)
    got = [nearest_palette(f.reshape(-1, 3).mean(axis=0)) for f in frames]
    assert got == [2, 0, 3, 0, 3]  # 9.0 s is past the 4-s clip: the last frame


def test_read_frames_picks_the_nearest_frame_and_seeks(clips):
    # 2 fps, 20 s, keyframe every 4 frames: frame k (pts k / 2) has grey level 6k + 4
    times = [0.5, 1.2, 1.3, 17.5, 3.0, 19.9, 30.0]
    frames = pp.read_frames(clips["grey"], times, size=16)
    levels = frames.reshape(len(times), -1).mean(axis=1)
    expected = [min(39, math.ceil(t * 2 - 0.5)) for t in times]  # nearest, ties to the earlier frame
    assert np.abs(levels - (6 * np.array(expected) + 4)).max() < 2.5, (levels, expected)


def test_read_frames_rejects_bad_files(clips, tmp_path):
    missing = tmp_path / "missing.mp4"
    with pytest.raises(ValueError, match="missing.mp4"):
        pp.read_frames(missing, [0.5])
    with pytest.raises(ValueError, match="text.mp4"):
        pp.read_frames(clips["text"], [0.5])
    with pytest.raises(ValueError, match="audio_only.m4a.*no video stream"):
        pp.read_frames(clips["audio_only"], [0.5])


def test_read_frames_applies_rotation_like_decord(media_dir):
    path = media_dir / "video_90.mov"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    from extract.decode import load_decord
    from extract.core.frames import prepare_frames

    decord = load_decord()
    reader = decord.VideoReader(str(path))
    pts = reader.get_frame_timestamp(range(len(reader)))[:, 0]
    index = int(np.argmin(np.abs(pts - 0.5)))
    expected = prepare_frames(reader.get_batch([index]).asnumpy(), 224)[0].astype(float)
    got = pp.read_frames(path, [0.5])[0].astype(float)
    assert np.abs(got - expected).mean() < 8


def shifted_copy(src, dst, offset_s: float):
    """``src``'s video stream remuxed (no re-encoding) with every timestamp ``offset_s`` later:
    a real clip whose stream starts at ``offset_s`` (none of ../shared/media does)."""
    import av

    with av.open(str(src)) as source, av.open(str(dst), mode="w") as out:
        stream = source.streams.video[0]
        copy = out.add_stream_from_template(stream)
        shift = int(round(offset_s / float(stream.time_base)))
        for packet in source.demux(stream):
            if packet.dts is None:
                continue
            packet.pts += shift
            packet.dts += shift
            packet.stream = copy
            out.mux(packet)
    return dst


def test_pictures_show_the_frames_the_features_use_on_a_late_starting_stream(media_dir, tmp_path):
    """On a real clip whose video stream starts at 1.5 s, the picture of second t is, pixel for
    pixel, the frame stage 1's decode path (decode_video with a one-frame-per-second grid) takes
    for second t; and, by an independent decoder (PyAV, every frame, times counted from the
    stream's start), the frame nearest to t + 0.5 s - not the frame at 1.5 s more, which a
    picker on the container's clock (the old PyAV one) showed."""
    import functools

    import av

    from extract.core.frames import prepare_frames
    from extract.decode import VideoRequest, decode_video
    from extract.extractor_base import FrameGrid

    src = media_dir / "v_ZNVhz7ctTq0.mp4"  # 30 fps, 14 s
    if not src.is_file():
        pytest.skip(f"{src} is absent")
    clip = shifted_copy(src, tmp_path / "late.mp4", 1.5)
    with av.open(str(clip)) as container:
        stream = container.streams.video[0]
        start = float(stream.start_time * stream.time_base)
        decoded = [(float(f.time) - start, f.to_ndarray(format="rgb24")) for f in container.decode(stream)]
    assert start == pytest.approx(1.5)
    T = 10
    pictures = pp.read_frames(clip, [t + 0.5 for t in range(T)])
    grid = FrameGrid(1, functools.partial(prepare_frames, image_size=224, resize="squash"), "picture")
    features = decode_video(VideoRequest("late", str(clip)), [grid], T, audio=False).frames["picture"][:, 0]
    np.testing.assert_array_equal(pictures, features)  # the same frames, pixel for pixel
    times = np.array([t for t, _ in decoded])
    for t in range(T):
        nearest = int(np.argmin(np.abs(times - (t + 0.5))))
        reference = prepare_frames(decoded[nearest][1][None], 224)[0].astype(float)
        assert np.abs(pictures[t] - reference).mean() < 2.0, t  # PyAV's RGB conversion, the same frame
        late = int(np.argmin(np.abs(times - (t + 0.5 - start))))  # the container clock's frame
        if late != nearest:
            wrong = prepare_frames(decoded[late][1][None], 224)[0].astype(float)
            assert np.abs(pictures[t] - wrong).mean() > np.abs(pictures[t] - reference).mean() + 2.0, t


# ---------------------------------------------------------------------------------------------
# arrays


def test_attention_grid_round_trips():
    flat = np.random.default_rng(0).random((5, 49)).astype(np.float32)
    grid = pp.attention_grid(flat)
    assert grid.shape == (5, 7, 7)
    assert grid[2, 3, 4] == flat[2, 3 * 7 + 4]  # row-major
    np.testing.assert_array_equal(grid.reshape(5, 49), flat)
    np.testing.assert_array_equal(pp.attention_grid(grid), grid)
    assert pp.attention_grid(np.ones((3, 64))).shape == (3, 8, 8)
    assert pp.attention_grid(np.ones((3, 1, 4, 4))).shape == (3, 4, 4)
    with pytest.raises(ValueError, match="square"):
        pp.attention_grid(np.ones((3, 50)))


# ---------------------------------------------------------------------------------------------
# plots


def test_attention_strip_draws_the_heads_own_values(tmp_path):
    S, H, W = 12, 56, 56
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 255, (S, H, W, 3), dtype=np.uint8)
    attention = rng.random((S, 49)).astype(np.float32) * 0.01
    peaks = [(t * 5) % 49 for t in range(S)]
    for t, cell in enumerate(peaks):
        attention[t, cell] = 1.0
    labels = ["dog" if t % 3 else "background" for t in range(S)]
    out = pp.plot_attention_strip(frames, attention, labels, rng.random(S), tmp_path / "strip.png", title="v", columns=10)
    np.testing.assert_array_equal(out["cells"], attention.reshape(S, 7, 7))
    assert out["maps"].shape == (S, H, W)
    cell = H / 7
    for t, peak in enumerate(peaks):
        y, x = np.unravel_index(np.argmax(out["maps"][t]), (H, W))
        assert int(y // cell) == peak // 7 and int(x // cell) == peak % 7
    # 12 panels, 10 per row: two rows
    width, height = png_size(out["path"])
    expected = 10 * pp.PANEL_WIDTH_IN / (2 * pp.PANEL_HEIGHT_IN + pp.STRIP_TITLE_IN)
    assert width / height == pytest.approx(expected, rel=0.02)
    # frames only
    bare = pp.plot_attention_strip(frames[:3], None, labels[:3], [0.5, 0.6, 0.7], tmp_path / "bare.png", columns=10)
    assert bare["maps"] is None and bare["cells"] is None and bare["path"].is_file()
    assert png_size(bare["path"])[0] == pytest.approx(3 * pp.PANEL_WIDTH_IN * 100, abs=2)


@pytest.mark.parametrize("S", [10, 120])
def test_plot_timeline_short_and_long(tmp_path, S):
    classes = ["dog", "car", "violin", "background"]
    rng = np.random.default_rng(S)
    probs = rng.dirichlet(np.ones(4), S)
    idx = np.full(S, 3)
    idx[2:6] = 0
    idx[S // 2: S // 2 + 1] = 1  # a 1-s event: no room for its text at 120 s
    idx[-3:] = 2
    labels = [classes[i] for i in idx]
    valid = np.ones(S, bool)
    valid[-1] = False
    events = [{"onset": 2, "offset": 6, "label": "dog", "mean_probability": 0.8},
              {"onset": S // 2, "offset": S // 2 + 1, "label": "car", "mean_probability": 0.6},
              {"onset": S - 3, "offset": S, "label": "violin", "mean_probability": float("nan")}]
    path = pp.plot_timeline(labels, probs, classes, valid, events, tmp_path / f"t{S}.png", title=f"{S} s")
    width, height = png_size(path)
    assert path.is_file() and height == 340
    assert width == (800 if S == 10 else round(100 * min(20, 4 + 0.12 * S)))
    # events derived from the labels when not given
    assert pp.plot_timeline(labels, probs, classes, valid, None, tmp_path / "derived.png").is_file()


def test_confidence_is_the_probability_of_the_label():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    np.testing.assert_allclose(pp._confidence(["a", "b"], probs, ["a", "b", "c"]), [0.7, 0.3])


def test_sol_strip_boxes_the_hot_block(tmp_path):
    S, H, W = 3, 224, 224
    frames = np.full((S, H, W, 3), 100, np.uint8)
    maps = np.full((S, 7, 7), 0.05, np.float32)
    maps[0, 2:4, 4:6] = 1.0  # rows 2-3, columns 4-5
    maps[1, 0:2, 0:2] = 1.0
    maps[2] = 0.3  # constant: no box
    out = pp.plot_sol_strip(frames, maps, ["dog", "dog", "background"], [0.9, 0.8, 0.5], tmp_path / "sol.png")
    cell = H / 7
    np.testing.assert_allclose(out["boxes"][0], [4 * cell, 2 * cell, 6 * cell, 4 * cell], atol=cell)
    np.testing.assert_allclose(out["boxes"][1], [0, 0, 2 * cell, 2 * cell], atol=cell)
    assert np.isnan(out["boxes"][2]).all()
    assert out["path"].is_file() and out["maps"].shape == (S, H, W)


# ---------------------------------------------------------------------------------------------
# the overlay video


def decode_all(path):
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [(f.time, f.to_ndarray(format="rgb24")) for f in container.decode(stream)]
        codec = stream.codec_context.name
        audio = len(container.streams.audio)
    return frames, codec, audio


def test_overlay_video_frames_and_attention(clips, tmp_path):
    grey = clips["root"] / "flat.mp4"
    write_clip(grey, np.full((30, 48, 64, 3), 128, np.uint8), fps=10)  # 3 s of mid grey, 4:3
    attention = np.zeros((3, 7, 7), np.float32)
    attention[1, 0, 0] = 1.0  # second 1: top-left
    attention[2, 6, 6] = 1.0  # second 2: bottom-right
    out = pp.write_overlay_video(grey, tmp_path / "o" / "overlay.mp4", attention, ["background", "dog", "dog"],
                                 [0.9, 0.8, 0.7], class_names=["dog", "background"])
    frames, codec, _ = decode_all(out)
    assert codec == "h264"
    assert abs(len(frames) - 30) <= 1
    picture_h = 224  # short side 224: 298 x 224 picture, the track below
    image = frames[15][1].astype(int)  # t = 1.5 s
    assert image.shape[1] == 298 and image.shape[0] > picture_h and image.shape[0] % 2 == 0
    q = 16  # corner patches, well inside the 42 x 32 px cells

    def redness(region):
        return float((region[..., 0] - region[..., 2]).mean())

    top_left, bottom_right = image[:q, :q], image[picture_h - q:picture_h, -q:]
    assert redness(top_left) > redness(bottom_right) + 40
    later = frames[25][1].astype(int)  # t = 2.5 s: the peak moved to the bottom-right
    assert redness(later[picture_h - q:picture_h, -q:]) > redness(later[:q, :q]) + 40
    # lower frame rate, and no attention
    half = pp.write_overlay_video(grey, tmp_path / "half.mp4", None, ["dog"] * 3, [0.5] * 3, fps=5, size=None)
    frames, _, _ = decode_all(half)
    assert abs(len(frames) - 15) <= 1 and frames[0][1].shape[1] == 64
    assert np.abs(frames[3][1][:48].astype(int) - 128).mean() < 6  # no overlay on the picture


def test_overlay_video_keeps_the_audio(clips, tmp_path):
    out = pp.write_overlay_video(clips["audio"], tmp_path / "a.mp4", np.ones((3, 49)), ["dog"] * 3, [0.5] * 3)
    frames, _, audio = decode_all(out)
    assert audio == 1 and abs(len(frames) - 30) <= 1
    assert nearest_palette(frames[25][1][50, 50]) == 2  # the picture of second 2


def test_overlay_video_rejects_bad_files(clips, tmp_path):
    with pytest.raises(ValueError, match="text.mp4"):
        pp.write_overlay_video(clips["text"], tmp_path / "x.mp4", None, ["dog"], [0.5])


def test_overlay_video_falls_back_to_mpeg4(clips, tmp_path, monkeypatch):
    import av

    real = av.container.OutputContainer.add_stream

    def no_x264(self, codec_name=None, *args, **kwargs):
        if codec_name == "libx264":
            raise ValueError("libx264 switched off by the test")
        return real(self, codec_name, *args, **kwargs)

    monkeypatch.setattr(av.container.OutputContainer, "add_stream", no_x264)
    out = pp.write_overlay_video(clips["colour"], tmp_path / "m.mp4", None, ["dog"] * 4, [0.5] * 4, fps=5)
    frames, codec, _ = decode_all(out)
    assert codec == "mpeg4" and abs(len(frames) - 20) <= 1


def test_overlay_errors_are_told_apart_by_type(clips, tmp_path, monkeypatch):
    """A failure to copy the audio (whatever its message says) writes the video again without
    audio; a failure to write video packets without audio is an EncodeError naming the output,
    never a VideoReadError of the input."""
    import av

    from extract.factories.media import EncodeError

    real = av.container.OutputContainer.mux

    def audio_breaks(self, packet):
        if packet.stream.type == "audio":
            raise RuntimeError("boom")
        return real(self, packet)

    monkeypatch.setattr(av.container.OutputContainer, "mux", audio_breaks)
    out = pp.write_overlay_video(clips["audio"], tmp_path / "a.mp4", None, ["dog"] * 3, [0.5] * 3)
    frames, _, audio = decode_all(out)
    assert audio == 0 and abs(len(frames) - 30) <= 1  # written again, without the audio
    assert nearest_palette(frames[25][1][50, 50]) == 2

    def disk_full(self, packet):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(av.container.OutputContainer, "mux", disk_full)
    with pytest.raises(EncodeError, match=r"b\.mp4.*No space left"):
        pp.write_overlay_video(clips["colour"], tmp_path / "b.mp4", None, ["dog"] * 4, [0.5] * 4)
    with pytest.raises(EncodeError, match="cannot be written"):  # a folder where the file must go
        monkeypatch.setattr(av.container.OutputContainer, "mux", real)
        (tmp_path / "c.mp4").mkdir()
        pp.write_overlay_video(clips["colour"], tmp_path / "c.mp4", None, ["dog"] * 4, [0.5] * 4)
