"""Decode and a short extraction on the real clips in ../shared/media (skipped when absent).

Expected outcomes are computed independently with PyAV (frame presentation times, the audio stream
decord reads, its decoded length), not copied from a previous run: video-valid seconds from the
frame times, audio-valid seconds from the audio length, the store's ``valid`` as their AND.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from extract.decode import DecodeError, VideoRequest, decode_video
from extract.extractors import VGG19Extractor
from extract.core.settings import load_pipeline

T = 10
EXPECTED_FAILURES = {"corrupted.mp4": "cannot decode video frames"}
SMALL = {"frames_per_segment": 2, "image_size": 32, "batch_frames": 8, "visual_weights": "random",
         "audio_weights": "random", "device": "cpu", "decode_workers": 2}


def media_files(media_dir: Path) -> list[Path]:
    files = sorted(p for p in media_dir.iterdir() if p.suffix.lower() in (".mp4", ".mkv", ".mov"))
    if not files:
        pytest.skip(f"no clips in {media_dir}")
    return files


def pyav_probe(path: Path) -> dict:
    """Frame pts (s) of the first video stream and the decoded length (s) of the first audio stream."""
    import av

    with av.open(str(path)) as container:
        video = container.streams.video[0]
        pts = sorted(float(p.pts * p.time_base) for p in container.demux(video) if p.pts is not None and p.size)
    audio_seconds = None
    with av.open(str(path)) as container:
        if container.streams.audio:
            stream = container.streams.audio[0]
            samples = sum(frame.samples for frame in container.decode(stream))
            audio_seconds = samples / stream.rate
    start = pts[0]
    return {"pts": np.asarray(pts) - start, "audio_seconds": audio_seconds}


def expected_video_valid(pts: np.ndarray, per_segment: int, min_fraction: float = 0.5) -> np.ndarray:
    """[T] bool: a segment is valid when >= half of its sample times fall before the stream's end
    (last pts + one frame duration)."""
    step = float(np.median(np.diff(pts))) if len(pts) > 1 else 0.0
    end = pts[-1] + step
    times = np.arange(T)[:, None] + (np.arange(per_segment)[None, :] + 0.5) / per_segment
    inside = (times < end).sum(axis=1)
    return inside >= math.ceil(min_fraction * per_segment)


def expected_audio_valid(seconds: float | None) -> np.ndarray:
    """[T] bool: the 16 kHz waveform reaches sample 16000 t + 15600 (the segment's VGGish patch)."""
    if seconds is None:
        return np.zeros(T, bool)
    samples = math.ceil(seconds * 16000)  # resampling keeps the duration
    return samples >= 16000 * np.arange(T) + 15600


@pytest.fixture(scope="module")
def probes(media_dir):
    return {p.name: pyav_probe(p) for p in media_files(media_dir) if p.name not in EXPECTED_FAILURES}


def test_decode_every_real_clip(media_dir, probes):
    from extract.config import ExtractConfig

    grid = VGG19Extractor.grid_for(ExtractConfig(frames_per_segment=16, image_size=32))
    for path in media_files(media_dir):
        request = VideoRequest(path.stem, str(path))
        if path.name in EXPECTED_FAILURES:
            with pytest.raises(DecodeError, match=EXPECTED_FAILURES[path.name]):
                decode_video(request, [grid], T)
            continue
        video = decode_video(request, [grid], T)
        probe = probes[path.name]
        counts = video.frame_valid[grid.name].sum(axis=1)
        np.testing.assert_array_equal(counts >= 8, expected_video_valid(probe["pts"], 16), err_msg=path.name)
        assert video.frames[grid.name].shape == (T, 16, 32, 32, 3)
        if probe["audio_seconds"] is None:
            assert video.audio is None and video.info["audio_error"] == "no audio stream", path.name
        else:
            window = min(T, probe["audio_seconds"])
            assert abs(len(video.audio) / 16000 - window) < 0.01, (path.name, len(video.audio))
            assert np.isfinite(video.audio).all() and np.abs(video.audio).max() > 1e-3, path.name


def test_known_properties_of_the_clips(media_dir):
    """Facts from SOURCE.md, checked on what the decoder reports."""
    from extract.config import ExtractConfig

    grid = VGG19Extractor.grid_for(ExtractConfig(frames_per_segment=16, image_size=32))
    files = {p.name: p for p in media_files(media_dir)}
    if "big_buck_bunny_small.mp4" in files:  # 5.3 s, 6-channel 48 kHz audio
        bunny = decode_video(VideoRequest("b", str(files["big_buck_bunny_small.mp4"])), [grid], T)
        assert (bunny.frame_valid[grid.name].sum(axis=1) >= 8).sum() == 5
        assert bunny.info["audio_channels"] == 6 and bunny.info["audio_rate"] == 48000
    if "nasa_13013.mp4" in files:  # 29.97 fps, 8 kHz stereo
        nasa = decode_video(VideoRequest("n", str(files["nasa_13013.mp4"])), [grid], T)
        assert nasa.info["fps"] == pytest.approx(30000 / 1001, rel=1e-4)
        assert nasa.info["audio_rate"] == 8000 and nasa.info["audio_channels"] == 2
    if "v_GGSY1Qvo990.mp4" in files:  # 19.62 fps
        odd = decode_video(VideoRequest("g", str(files["v_GGSY1Qvo990.mp4"])), [grid], T)
        assert odd.info["fps"] == pytest.approx(19.62, rel=1e-4) and odd.frame_valid[grid.name].all()


def test_rotation_metadata_is_applied(media_dir):
    import av

    from extract.decode import load_decord

    path = media_dir / "video_90.mov"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    decord = load_decord()
    upright = decord.VideoReader(str(path)).get_batch([0]).asnumpy()[0].astype(np.float64)
    with av.open(str(path)) as container:
        frame = next(container.decode(video=0))
        coded = frame.to_ndarray(format="rgb24").astype(np.float64)
        rotation = frame.rotation  # degrees counter-clockwise to display upright
    assert coded.shape[1] > coded.shape[0] and upright.shape[0] > upright.shape[1]
    rotated = np.rot90(coded, k=round(rotation / 90) % 4)
    assert rotated.shape == upright.shape
    assert np.abs(rotated - upright).mean() < 8  # same picture (the two decoders convert colours alike)


@pytest.mark.slow
def test_short_extraction_of_every_real_clip(media_dir, probes, tmp_path):
    import torch

    from extract.extractors import build_extractors
    from extract.run import run_extraction
    from extract.core.store import STATUS_DONE, STATUS_FAILED, open_store

    torch.set_num_threads(1)
    pipeline = load_pipeline(None, {"extract": SMALL, "store": {"rows_per_shard": 4}}, search=False)
    files = media_files(media_dir)
    requests = [VideoRequest(p.name, str(p)) for p in files]
    extractors = build_extractors(pipeline.extract, "cpu")
    summary = run_extraction(pipeline, requests, store_path=tmp_path / "real.zarr", progress=False, extractors=extractors)
    assert summary.failed == len([p for p in files if p.name in EXPECTED_FAILURES]) and summary.exit_code == 1

    store = open_store(tmp_path / "real.zarr")
    status, reasons, valid = store.status(), store.reasons(), store.read("valid")
    for row, path in enumerate(files):
        if path.name in EXPECTED_FAILURES:
            assert status[row] == STATUS_FAILED and EXPECTED_FAILURES[path.name] in reasons[row]
            assert not valid[row].any() and not store.read("visual", [row]).any()
            continue
        probe = probes[path.name]
        want = expected_video_valid(probe["pts"], 2) & expected_audio_valid(probe["audio_seconds"])
        assert status[row] == STATUS_DONE, (path.name, reasons[row])
        np.testing.assert_array_equal(valid[row], want, err_msg=path.name)
        visual = store.read("visual", [row])[0].astype(np.float32)
        seen = expected_video_valid(probe["pts"], 2)
        assert np.isfinite(visual).all() and not visual[~seen].any(), path.name
        assert all(visual[t].any() for t in np.flatnonzero(seen)), path.name
        audio = store.read("audio", [row])[0]
        assert np.isfinite(audio).all() and (np.abs(audio[want]).sum(axis=1) > 0).all(), path.name
