"""The ``ave2018`` recipe: features equal to the public AVE files' extractor (Tian et al. 2018).

* the recipe sets its keys, refuses contradicting ones, and is recorded in the fingerprint;
* the Keras legacy-HDF5 VGG-19 weights load in both weight-name styles (by ``weight_names``
  order), wrong files are refused naming file, layer and shape, and the ``.pth`` of the same
  weights computes the same; known files of the same weights have one logical identity;
* frame numbers equal the reference's formula at 25, 29.97 and 30 fps, odd frame counts, and for
  a window in the middle of a long video; ffmpeg's constant-rate frame list is reproduced exactly
  (checked against the ffmpeg binary on variable-rate clips and ../shared/media);
* on the real clips of ../shared/media, avel's network inputs equal the reference's (ffmpeg rgb24
  frames, its frame rule, cv2 resize, BGR minus means) for every frame, and its features equal a
  float64 transcription of the reference's VGG-19 (own convolutions) to 1e-4.
"""
from __future__ import annotations

import dataclasses
import fractions
import hashlib
import json

import numpy as np
import pytest

from ave2018_testutils import (
    CAFFE_MEAN_BGR,
    ffmpeg_rgb24_frames,
    random_vgg19_convs,
    reference_frame_numbers,
    reference_inputs,
    reference_pool5,
    write_keras_vgg19,
    write_torch_vgg19,
)
from extract import weights as W
from extract.config import ExtractConfig
from extract.extractor_base import DecodedVideo, FrameGrid
from extract.core.frames import cfr_output_frames, index_rule_plan, reference_frame_indices
from extract.keras_h5 import KerasLayoutError, vgg19_state_dict
from extract.core.settings import ConfigError, load_pipeline

MEDIA = ["v_GGSY1Qvo990.mp4", "v_ZNVhz7ctTq0.mp4", "nasa_13013.mp4", "big_buck_bunny_small.mp4",
         "flipping_a_pancake.mkv", "video_90.mov", "unordered.mov"]


def ave2018(**extract) -> ExtractConfig:
    return load_pipeline(None, {"extract": {"recipe": "ave2018", **extract}}, search=False).extract


@pytest.fixture(scope="module")
def convs():
    return random_vgg19_convs(seed=3)


@pytest.fixture(scope="module")
def weight_files(convs, tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    return {
        "keras1": write_keras_vgg19(root / "vgg19_keras1.h5", convs, "keras1"),
        "keras2": write_keras_vgg19(root / "vgg19_keras2.h5", convs, "keras2", top=True),
        "pth": write_torch_vgg19(root / "vgg19_same.pth", convs),
    }


# ------------------------------------------------------------------------------------------
# the recipe


def test_recipe_sets_its_keys_and_refuses_contradictions():
    cfg = ave2018()
    assert (cfg.frames_per_segment, cfg.image_size, cfg.resize, cfg.frame_rule, cfg.interpolation, cfg.normalize,
            cfg.vggish_relu, cfg.vggish_pca, cfg.visual_weights, cfg.audio_weights, cfg.precision) == (
        16, 224, "squash", "index", "linear", "caffe", True, False, "keras-imagenet", "vggish", "fp32")
    # a key equal to the recipe's is fine; a contradicting one names the key
    assert ave2018(frames_per_segment=16).frames_per_segment == 16
    for key, value in [("frames_per_segment", 8), ("normalize", "imagenet"), ("frame_rule", "pts"),
                       ("interpolation", "auto"), ("image_size", 256), ("vggish_pca", True)]:
        with pytest.raises(ConfigError, match=rf"extract\.{key}: recipe 'ave2018' sets"):
            ave2018(**{key: value})
    with pytest.raises(ConfigError, match=r"extract\.visual_weights: 'imagenet' does not go with recipe 'ave2018'"):
        ave2018(visual_weights="imagenet")
    # other weights and precision stay (they enter the fingerprint); "pretrained" = the recipe's
    assert ave2018(visual_weights="random", precision="bf16").precision == "bf16"
    assert ave2018(visual_weights="pretrained").visual_weights == "keras-imagenet"
    # avel's own recipe is unchanged: every default as before
    assert load_pipeline(None, {"extract": {"visual_weights": "pretrained"}}, search=False).extract == ExtractConfig()


def test_the_recipe_enters_the_fingerprint_and_avel_stores_keep_theirs():
    from extract.extractors import extractor_identity
    from extract.provenance import store_attrs

    avel = load_pipeline(None, {"extract": {"visual_weights": "random", "audio_weights": "random"}}, search=False).extract
    ident = extractor_identity(avel)
    # avel's identity texts are those of every store made before recipes existed
    assert ident["vgg19"]["preprocessing"]["frame_times"] == "start + t + (i + 0.5) / F, nearest pts, ties earlier"
    assert "recipe" not in store_attrs(avel, ident)["fingerprint_fields"]
    ave = ave2018(visual_weights="random", audio_weights="random")
    fields = store_attrs(ave, extractor_identity(ave))["fingerprint_fields"]
    assert fields["recipe"] == "ave2018"
    assert fields["extractors"]["vgg19"]["preprocessing"]["normalize"] == {"order": "BGR", "range": "0-255",
                                                                           "mean": list(CAFFE_MEAN_BGR)}


def test_cli_recipe_option_and_repository_pipeline(tmp_path):
    from click.testing import CliRunner

    from extract.cli import main

    out = CliRunner().invoke(main, ["--config", str(tmp_path / "none.yaml")]).output  # a missing file is an error
    assert "does not exist" in out
    (tmp_path / "p.yaml").write_text("extract: {frames_per_segment: 4}\n")
    res = CliRunner().invoke(main, ["--config", str(tmp_path / "p.yaml"), "--preset", "ave2018", "--print-config"])
    assert res.exit_code == 2 and "extract.frames_per_segment: recipe 'ave2018' sets 16, got 4" in res.output
    res = CliRunner().invoke(main, ["--config", str(tmp_path / "p.yaml"), "--recipe", "avel", "--weights", "pretrained",
                                    "--print-config"])
    assert res.exit_code == 0 and "visual_weights: imagenet" in res.output and "frames_per_segment: 4" in res.output
    from pathlib import Path

    repo = load_pipeline(Path(__file__).resolve().parents[1] / "pipeline.yaml").extract  # the AVE pipeline.yaml uses the recipe
    assert repo.recipe == "ave2018" and repo.visual_weights == "keras-imagenet" and repo.frame_rule == "index"


# ------------------------------------------------------------------------------------------
# weights


@pytest.mark.parametrize("style", ["keras1", "keras2"])
def test_keras_h5_loads_by_weight_names_order_in_both_styles(weight_files, convs, style):
    state = vgg19_state_dict(weight_files[style])
    assert len(state) == 32
    indices = [0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34]
    for k, (w, b) in zip(indices, convs):
        np.testing.assert_array_equal(state[f"features.{k}.weight"], w)  # HWIO -> OIHW, exactly
        np.testing.assert_array_equal(state[f"features.{k}.bias"], b)
    from extract.nets import build_vgg19_pool5

    net = build_vgg19_pool5(W.resolve_weights(str(weight_files[style]), "vgg19"))  # loads strictly
    assert float(net[0].weight[5, 2, 1, 0]) == float(convs[0][0][5, 2, 1, 0])


def test_pth_route_equals_h5_route(weight_files):
    import torch

    from extract.nets import build_vgg19_pool5

    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 60
    outs = [build_vgg19_pool5(W.resolve_weights(str(weight_files[k]), "vgg19"))(x) for k in ("keras1", "keras2", "pth")]
    assert float(outs[0].abs().max()) > 0
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    torch.testing.assert_close(outs[2], outs[0], rtol=0, atol=0)


def test_keras_h5_refusals_name_file_layer_and_shape(convs, tmp_path):
    import h5py

    bad = [(w.copy(), b.copy()) for w, b in convs]
    path = write_keras_vgg19(tmp_path / "th_order.h5", bad, "keras1")
    with h5py.File(path, "r+") as f:  # a Theano-ordered (OIHW) kernel in block3_conv2
        del f["block3_conv2"]["block3_conv2_W_1:0"]
        f["block3_conv2"].create_dataset("block3_conv2_W_1:0", data=bad[5][0])
    with pytest.raises(KerasLayoutError, match=r"th_order\.h5: layer 'block3_conv2': kernel 'block3_conv2_W_1:0' has "
                                               r"shape \(256, 256, 3, 3\), expected \(3, 3, 256, 256\).*OIHW"):
        vgg19_state_dict(path)
    swapped = write_keras_vgg19(tmp_path / "swapped.h5", convs, "keras2")
    with h5py.File(swapped, "r+") as f:  # weight_names in the wrong order: bias first
        f["block1_conv1"].attrs["weight_names"] = np.array([b"block1_conv1/bias:0", b"block1_conv1/kernel:0"])
    with pytest.raises(KerasLayoutError, match=r"layer 'block1_conv1': kernel 'block1_conv1/bias:0' has shape \(64,\)"):
        vgg19_state_dict(swapped)
    with h5py.File(tmp_path / "plain.h5", "w") as f:
        f.create_dataset("avadataset", data=np.zeros(3))
    with pytest.raises(KerasLayoutError, match=r"plain\.h5: no 'layer_names' attribute"):
        vgg19_state_dict(tmp_path / "plain.h5")
    short = write_keras_vgg19(tmp_path / "short.h5", convs, "keras1")
    with h5py.File(short, "r+") as f:
        f.attrs["layer_names"] = np.array([n.encode() for n in ["input_1", "block1_conv1", "block1_conv2"]])
    with pytest.raises(KerasLayoutError, match=r"short\.h5: 2 layers with weights, VGG-19 has 16"):
        vgg19_state_dict(short)
    # through the weights rule, the refusal reaches the user naming the file
    from extract.nets import build_vgg19_pool5

    with pytest.raises(ValueError, match="short.h5"):
        build_vgg19_pool5(W.resolve_weights(str(short), "vgg19"))


def test_known_files_of_the_same_weights_have_one_identity(weight_files, monkeypatch, tmp_path):
    """The Keras .h5 (md5) and the .pth (sha256 prefix) of the same weights both resolve to the
    logical identity, from a path or from the "keras-imagenet" lookup; an unknown file keeps its sha256."""
    h5, pth = weight_files["keras1"], weight_files["pth"]
    table = (W.KnownFile("vgg19", "vgg19-keras-imagenet", "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5", "url",
                         md5=hashlib.md5(h5.read_bytes()).hexdigest()),
             W.KnownFile("vgg19", "vgg19-keras-imagenet", "vgg19-d01eb7cb.pth", "url",
                         sha256_prefix=hashlib.sha256(pth.read_bytes()).hexdigest()[:8]))
    unknown = W.resolve_weights(str(h5), "vgg19").identity()
    assert unknown == {"name": h5.name, "sha256": hashlib.sha256(h5.read_bytes()).hexdigest(), "seed": None}
    monkeypatch.setattr(W, "KNOWN_FILES", table)
    logical = {"name": "vgg19-keras-imagenet", "sha256": None, "seed": None}
    assert W.resolve_weights(str(h5), "vgg19").identity() == logical
    assert W.resolve_weights(str(pth), "vgg19").identity() == logical
    assert W.declared_identity("keras-imagenet", "vgg19") == logical  # what import-h5 records, no file needed
    folder = tmp_path / "dir"
    folder.mkdir()
    (folder / "vgg19-d01eb7cb.pth").write_bytes(pth.read_bytes())  # found by the "keras-imagenet" lookup
    monkeypatch.setenv(W.WEIGHTS_DIR_ENV, str(folder))
    monkeypatch.setenv(W.OFFLINE_ENV, "1")
    found = W.resolve_weights("keras-imagenet", "vgg19")
    assert found.path == folder / "vgg19-d01eb7cb.pth" and found.identity() == logical


def test_every_canonical_file_is_in_the_known_files_table():
    names = {k.filename for k in W.KNOWN_FILES}
    for canon in list(W.CANONICAL.values()) + [c for alts in W.ALTERNATES.values() for c in alts.values()]:
        assert {canon.filename, *canon.aliases} - {"vggish_pca_params-970ea276.pth"} <= names
    keras = [k for k in W.KNOWN_FILES if k.logical == "vgg19-keras-imagenet"]
    assert {k.md5 for k in keras if k.md5} == {"253f8cb515780f3b799900260a226db6", "cbe5617147190e668d6c5d5026f83318"}


def test_missing_keras_weights_name_every_file_and_where_to_get_them(monkeypatch, tmp_path):
    monkeypatch.setenv(W.WEIGHTS_DIR_ENV, str(tmp_path))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.setenv(W.OFFLINE_ENV, "1")
    with pytest.raises(W.WeightsUnavailable) as info:
        W.resolve_weights("keras-imagenet", "vgg19")
    text = str(info.value)
    assert "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5" in text and "vgg19-d01eb7cb.pth" in text
    assert "storage.googleapis.com/tensorflow/keras-applications/vgg19" in text
    assert str(tmp_path / "keras" / "models" / "vgg19_weights_tf_dim_ordering_tf_kernels.h5") in text


def test_caffe_normalisation_is_keras_preprocess_input():
    from extract.nets import caffe_normalize_frames

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (2, 5, 4, 3), dtype=np.uint8)
    got = caffe_normalize_frames(frames).numpy()  # [N, 3, H, W]
    want = frames.astype(np.float64)[..., ::-1] - np.asarray(CAFFE_MEAN_BGR)
    np.testing.assert_allclose(got.transpose(0, 2, 3, 1), want, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------
# frame numbers


def test_reference_formula_transcription():
    for n in [300, 299, 301, 251, 355, 132, 390, 17, 10, 9, 0]:
        index, valid = reference_frame_indices(n, 10, 16)
        assert index.reshape(-1).tolist() == reference_frame_numbers(n)
        assert valid.all() == (n > 0)
    index, _ = reference_frame_indices(80, 10, 8)  # the AVE10K script's sample_num = 8
    assert index.reshape(-1).tolist() == reference_frame_numbers(80, sample_num=8)


BITS = 12


def barcode_clip(path, count: int, fps, audio: bool = False):
    """A clip whose frame k shows k as 12 black/white bars (survives H.264), 64x48."""
    from extract.factories.media import write_clip

    frames = np.zeros((count, 48, 64, 3), np.uint8)
    for k in range(count):
        for b in range(BITS):
            if (k >> b) & 1:
                frames[k, :, 5 * b: 5 * b + 5] = 255
    wave = (0.1 * np.sin(np.arange(int(16000 * count / float(fps))) / 5)).astype(np.float32) if audio else None
    return write_clip(path, frames, fps=fps, audio=wave, sample_rate=16000, crf=10)


def read_barcode(frame: np.ndarray) -> int:
    return sum(1 << b for b in range(BITS) if frame[:, 5 * b + 1: 5 * b + 4].mean() > 127)


RAW_INDEX_GRID = FrameGrid(per_segment=16, prepare=lambda frames: frames, name="raw_index", rule="index")


def decoded_numbers(path, start=0.0, duration=None, segments=10):
    from extract.decode import VideoRequest, decode_video

    video = decode_video(VideoRequest("k", str(path), start, duration), [RAW_INDEX_GRID], segments, audio=False)
    frames, valid = video.frames["raw_index"], video.frame_valid["raw_index"]
    shown = np.array([[read_barcode(f) for f in row] for row in frames])
    return video.info["frame_index"]["raw_index"], shown, valid


@pytest.mark.parametrize("fps, count", [(25, 251), (fractions.Fraction(30000, 1001), 299), (30, 301), (30, 291)])
def test_frame_numbers_equal_the_reference_formula(tmp_path, fps, count):
    path = barcode_clip(tmp_path / "c.mp4", count, fps)
    index, shown, valid = decoded_numbers(path)
    expected = np.asarray(reference_frame_numbers(count)).reshape(10, 16)
    np.testing.assert_array_equal(index, expected)
    np.testing.assert_array_equal(shown, expected)  # the pixels are those frames
    assert valid.all()


def test_frame_numbers_of_a_window_in_the_middle_of_a_long_video(tmp_path):
    rate = fractions.Fraction(30000, 1001)
    path = barcode_clip(tmp_path / "long.mp4", 1049, rate)  # 35 s at 29.97 fps
    index, shown, valid = decoded_numbers(path, start=10.0, duration=10.0)
    inside = [k for k in range(1049) if 10 <= k / rate < 20]  # the window's frames, exact arithmetic
    expected = inside[0] + np.asarray(reference_frame_numbers(len(inside))).reshape(10, 16)
    np.testing.assert_array_equal(index, expected)
    np.testing.assert_array_equal(shown, expected)
    assert valid.all() and len(inside) == 300
    # the last window is partial (5 s): seconds keep their length, the missing ones are invalid
    index, shown, valid = decoded_numbers(path, start=30.0, duration=10.0)
    first = next(k for k in range(1049) if k / rate >= 30)
    expected = first + np.asarray(reference_frame_numbers(300)).reshape(10, 16)  # the interval of a full window
    assert valid[:4].all() and not valid[5:].any()
    np.testing.assert_array_equal(index[valid], expected[valid])
    np.testing.assert_array_equal(shown[valid], expected[valid])


def test_index_plan_partial_rule_units():
    times = np.arange(150) / 30.0  # a 5-s constant-rate stream
    position, valid = index_rule_plan(times, 10, 16, 30.0)
    assert valid[:5].all() and not valid[5:].any()
    np.testing.assert_array_equal(position[valid], np.asarray(reference_frame_numbers(300)).reshape(10, 16)[valid])
    position, valid = index_rule_plan(np.arange(420) / 30.0, 10, 16, 30.0)  # 14 s, no window: stretched
    np.testing.assert_array_equal(position, np.asarray(reference_frame_numbers(420)).reshape(10, 16))


def test_cfr_output_frames_of_a_constant_rate_stream_is_every_frame():
    pts = np.arange(299) * 1001 / 30000
    source, slot = cfr_output_frames(pts, 30000 / 1001)
    np.testing.assert_array_equal(source, np.arange(299))
    np.testing.assert_array_equal(slot, np.arange(299))
    perm = np.random.default_rng(0).permutation(299)  # decoder order does not matter
    np.testing.assert_array_equal(perm[cfr_output_frames(pts[perm], 30000 / 1001)[0]], np.arange(299))


def vfr_clip(path, times, audio: bool):
    """A variable-rate H.264 clip (frame k shows k as bars) with frames at ``times`` (s)."""
    import av

    container = av.open(str(path), "w")
    stream = container.add_stream("libx264", rate=1000)
    stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
    stream.options = {"bf": "0", "crf": "10"}
    if audio:
        astream = container.add_stream("aac", rate=16000)
        astream.layout = "mono"
    for k, t in enumerate(times):
        image = np.zeros((48, 64, 3), np.uint8)
        for b in range(10):
            if (k >> b) & 1:
                image[:, 6 * b: 6 * b + 6] = 255
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        frame.pts = int(round(t * 1000))
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    if audio:
        wave = (0.1 * np.sin(np.arange(int(16000 * (times[-1] + 0.2))) / 10)).astype(np.float32)[None]
        for i in range(0, wave.shape[1], 1024):
            chunk = av.AudioFrame.from_ndarray(np.ascontiguousarray(wave[:, i: i + 1024]), format="fltp", layout="mono")
            chunk.sample_rate = 16000
            for packet in astream.encode(chunk):
                container.mux(packet)
        for packet in astream.encode():
            container.mux(packet)
    container.close()
    return path


def frames_through_cfr(path):
    """avel's constant-rate frame list of a file (decord frames, :func:`cfr_output_frames`), as
    [K] digests of the frames' bytes."""
    from extract.decode import load_decord, stream_timing

    decord = load_decord()
    reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
    pts = np.asarray(reader.get_frame_timestamp(np.arange(len(reader))))[:, 0]
    timing = stream_timing(str(path), frames=len(reader))
    source, _ = cfr_output_frames(pts, timing.rate, timing.durations, timing.offset, timing.single_stream)
    digests = {}
    for lo in range(0, len(reader), 64):
        batch = reader.get_batch(list(range(lo, min(lo + 64, len(reader))))).asnumpy()
        for k, frame in enumerate(batch):
            digests[lo + k] = hashlib.blake2b(frame.tobytes(), digest_size=16).hexdigest()
    return [digests[int(s)] for s in source], (reader[0].shape if len(reader) else None)


def ffmpeg_digests(path):
    """[K] digests of the frames imageio's ffmpeg reader gives (``-pix_fmt rgb24 ... image2pipe``)."""
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg", reason="the ffmpeg binary comes with imageio-ffmpeg (test extra)")
    reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    meta = next(reader)
    out = [hashlib.blake2b(bytes(raw), digest_size=16).hexdigest() for raw in reader]
    return out, meta


def _vfr_cases():
    rng = np.random.default_rng(1)
    return {
        "rate_sections": np.concatenate([np.arange(0, 4, 1 / 30), np.arange(4, 7, 1 / 12),
                                         np.arange(7, 10, 1 / 25) + rng.uniform(0, 0.01, 75)]),
        "burst": np.concatenate([np.arange(0, 3, 1 / 30), np.arange(3, 5, 1 / 60), np.arange(5, 10, 1 / 30)]),
        "gap": np.concatenate([np.arange(0, 3, 1 / 30), np.arange(4.5, 10, 1 / 30)]),
        "jitter": np.sort(np.arange(0, 10, 1 / 30) + rng.uniform(-0.012, 0.012, 300)).clip(0),
        "late_video": np.arange(0.2, 10, 1 / 30),
    }


@pytest.mark.parametrize("audio", [False, True], ids=["video-only", "with-audio"])
@pytest.mark.parametrize("case", sorted(_vfr_cases()))
def test_constant_rate_frames_equal_ffmpegs_on_variable_rate_clips(tmp_path, case, audio):
    times = np.unique(np.round(_vfr_cases()[case], 3))
    path = vfr_clip(tmp_path / f"{case}.mp4", times, audio)
    want, _ = ffmpeg_digests(path)
    got, _ = frames_through_cfr(path)
    assert len(got) == len(want)  # the same number of frames (duplicates and drops included)
    assert got == want


@pytest.mark.parametrize("name", MEDIA)
def test_decord_frames_equal_ffmpeg_rgb24_on_real_media(media_dir, name):
    """The decoder measurement: imageio's frames (ffmpeg rgb24: auto-rotated, ffmpeg's default
    video stream, constant frame rate) and avel's (decord + the constant-rate list) are identical,
    pixel for pixel, on every clip of ../shared/media."""
    want, meta = ffmpeg_digests(media_dir / name)
    got, shape = frames_through_cfr(media_dir / name)
    assert shape[:2] == tuple(meta["size"][::-1])  # rotation applied by both (video_90.mov: 320 x 568)
    assert got == want, f"{sum(a != b for a, b in zip(got, want))} of {len(want)} frames differ"


# ------------------------------------------------------------------------------------------
# parity with the reference on real clips


def reference_frames(path):
    """All frames as the reference read them (ffmpeg rgb24 via imageio-ffmpeg; PyAV rgb24 when it
    is not installed: the same libswscale conversion)."""
    frames = ffmpeg_rgb24_frames(path)
    if frames is None:
        import av

        with av.open(str(path)) as container:
            frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    return frames


@pytest.mark.parametrize("name", ["v_GGSY1Qvo990.mp4", "v_ZNVhz7ctTq0.mp4", "nasa_13013.mp4", "flipping_a_pancake.mkv",
                                  "big_buck_bunny_small.mp4"])
def test_network_inputs_equal_the_reference_on_real_clips(media_dir, name):
    """Every one of the 160 inputs of a video: avel's decode + frame rule + resize + caffe
    normalisation = the reference's frames, video_frame_sample, cv2.resize and preprocess_input.
    (big_buck_bunny_small is 5.3 s: avel keeps one-second segments there, the interval of a full
    10-s window, where the reference would have squeezed it onto 10 segments; docs/extraction.md.)"""
    import cv2
    import torch

    from extract.decode import VideoRequest, decode_video
    from extract.extractors import get_extractor
    from extract.nets import caffe_normalize_frames

    frames = reference_frames(media_dir / name)
    short = name.startswith("big_buck_bunny")
    numbers = np.asarray(reference_frame_numbers(250 if short else len(frames)))  # 25 fps: a full window is 250
    cfg = ave2018(visual_weights="random")
    grid = get_extractor("vgg19").grid_for(cfg)
    video = decode_video(VideoRequest(name, str(media_dir / name)), [grid], 10, audio=False)
    got, valid = video.frames[grid.name].reshape(160, 224, 224, 3), video.frame_valid[grid.name].reshape(160)
    np.testing.assert_array_equal(valid, numbers < len(frames))
    assert valid.all() != short
    want = np.stack([cv2.resize(frames[n], (224, 224)) for n in numbers[valid]])
    np.testing.assert_array_equal(got[valid], want)
    x = caffe_normalize_frames(torch.from_numpy(got[valid][:16])).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(x, reference_inputs(frames, numbers[valid][:16]), rtol=0, atol=1e-4)


def avel_segment_features(path, weights_path, segment, batch=16):
    """avel's ave2018 features of one segment of a video, through the extractor's own compute:
    its stored row (float16 [1, 7, 7, 512]) and the float64 mean of the float32 pool5 maps its
    forwards produced ([1, 7, 7, 512])."""
    from extract.decode import VideoRequest, decode_video
    from extract.extractors import VGG19Extractor

    cfg = dataclasses.replace(ave2018(visual_weights=str(weights_path), audio_weights="random"), batch_frames=batch)
    extractor = VGG19Extractor(cfg, "cpu")
    grid = extractor.frame_grid
    video = decode_video(VideoRequest("v", str(path)), [grid], 10, audio=False)
    sub = DecodedVideo("v", {grid.name: video.frames[grid.name][[segment]]},
                       {grid.name: video.frame_valid[grid.name][[segment]]}, None, video.info)
    extractor.cfg = dataclasses.replace(cfg, segments=1)  # compute this one segment
    seen = []
    forward = extractor._forward
    extractor._forward = lambda frames: seen.append(forward(frames)) or seen[-1]
    row = extractor.compute([sub])[0]["visual"]
    pooled = np.concatenate(seen).astype(np.float64)  # [16, 512, 7, 7]
    assert pooled.shape[0] == 16
    return pooled.mean(axis=0).transpose(1, 2, 0)[None], row


@pytest.mark.slow
def test_features_equal_the_float64_reference_on_a_real_clip(media_dir, weight_files, convs):
    """avel's ave2018 features (random weights in the Keras layout of the public weights file)
    against the reference transcribed in float64 with its own convolutions, on one 16-frame segment
    of a real 19.62-fps clip, to 1e-4 relative. (Slow: 16 VGG-19 forwards at 224 x 224 in float32
    and 16 in float64, ~30 s of CPU. The other clips' inputs are checked exactly, for every frame,
    by test_network_inputs_equal_the_reference_on_real_clips; both weight-name styles load to the
    same tensors exactly, test_keras_h5_loads_by_weight_names_order_in_both_styles.)"""
    name, segment = "v_GGSY1Qvo990.mp4", 6
    frames = reference_frames(media_dir / name)
    numbers = reference_frame_numbers(len(frames))[16 * segment: 16 * segment + 16]
    inputs = reference_inputs(frames, numbers)
    want = np.concatenate([reference_pool5(inputs[k: k + 4], convs) for k in range(0, 16, 4)]).mean(axis=0)[None]
    means, row = avel_segment_features(media_dir / name, weight_files["keras1"], segment)
    scale = np.abs(want).max()
    assert scale > 1.0  # random weights that keep the activations alive
    relative = np.linalg.norm(means - want) / np.linalg.norm(want)
    assert relative < 1e-4 and np.abs(means - want).max() < 1e-4 * scale, relative
    # the stored row is that mean in float16
    np.testing.assert_allclose(row.astype(np.float64), want, rtol=2 ** -10, atol=1e-4 * scale)


def test_decoder_and_frame_rule_record_in_the_identity():
    cfg = ave2018(visual_weights="random", audio_weights="random")
    from extract.extractors import extractor_identity

    text = json.dumps(extractor_identity(cfg)["vgg19"]["preprocessing"])
    assert "int(n / T)" in text and "constant-rate" in text and "INTER_LINEAR" in text


def test_predict_checks_the_recipe_before_any_work(weight_files, tmp_path):
    """avel-predict's first step on a run trained on an ave2018 (or imported) store: the weights
    resolve and give the training store's fingerprint; a missing file or other weights are
    refused, naming the file or the differing fields (tests/test_ave2018_e2e.py: end to end)."""
    from extract.extractors import extractor_identity
    from extract.provenance import store_attrs
    from extract.core.settings import to_dict
    from train.predict.run import LoadedRun, PredictError, check_features_recipe

    cfg = ave2018(visual_weights=str(weight_files["keras1"]), audio_weights="random")
    attrs = store_attrs(cfg, extractor_identity(cfg))
    features = {"fingerprint": attrs["fingerprint"], "fingerprint_fields": attrs["fingerprint_fields"],
                "extractor": to_dict(cfg), "segments": 10}
    run = LoadedRun(None, {}, tmp_path / "checkpoint.safetensors", ["a", "background"], features)
    check_features_recipe(run, "cpu")  # the same weights here: nothing to say
    other = dict(features, extractor={**features["extractor"], "visual_weights": str(weight_files["keras2"])})
    with pytest.raises(PredictError, match=r"differing: extractors\.vgg19\.weights\.vgg19\.name: 'vgg19_keras1\.h5' -> "
                                           r"'vgg19_keras2\.h5'"):
        check_features_recipe(LoadedRun(None, {}, run.checkpoint, run.class_names, other), "cpu")
    gone = dict(features, extractor={**features["extractor"], "visual_weights": str(tmp_path / "moved.h5")})
    with pytest.raises(PredictError, match=r"moved\.h5 .*does not exist"):
        check_features_recipe(LoadedRun(None, {}, run.checkpoint, run.class_names, gone), "cpu")


def test_predict_pre_check_accepts_the_fingerprint_of_an_extracted_store(tmp_path):
    """The fingerprint avel-predict recomputes from a store's recorded configuration before any
    work is the one the extraction wrote, so runs on extracted stores go on (an avel store here;
    for ave2018 the end-to-end test extracts into the imported store, whose fingerprint the
    pre-check accepts)."""
    from extract.decode import VideoRequest
    from extract.factories.media import write_clip
    from extract.run import run_extraction
    from extract.core.store import open_store
    from train.predict.run import LoadedRun, check_features_recipe
    from train.tasks.base import store_recipe

    rng = np.random.default_rng(0)
    path = write_clip(tmp_path / "c.mp4", rng.integers(0, 255, (20, 48, 64, 3), dtype=np.uint8), fps=10,
                      audio=(0.1 * rng.standard_normal(32000)).astype(np.float32), sample_rate=16000)
    extract = {"recipe": "avel", "segments": 2, "visual_weights": "random", "audio_weights": "random",
               "batch_frames": 2, "decode_workers": 1, "device": "cpu", "frames_per_segment": 1, "image_size": 32}
    pipeline = load_pipeline(None, {"extract": extract, "store": {"rows_per_shard": 2}}, search=False)
    summary = run_extraction(pipeline, [VideoRequest("c", str(path))], store_path=tmp_path / "s.zarr", progress=False)
    assert summary.done == 1
    store = open_store(tmp_path / "s.zarr")
    features = store_recipe(store.path, store.fingerprint, store.attrs, store.segments)
    check_features_recipe(LoadedRun(None, {}, tmp_path / "ck.safetensors", ["a", "background"], features), "cpu")
