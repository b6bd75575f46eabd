"""Extractors of the sounding-object maps (extract/sol_extractors.py), with random weights on tiny
hand-made DecodedVideo objects, against direct torchvision / VGGish forwards."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from extract.config import ExtractConfig
from extract.extractors import DecodedVideo, get_extractor
from extract.sol_extractors import ResNet152MapsExtractor, VGGishMapsExtractor

torch.set_num_threads(2)

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def _cfg(**kw) -> ExtractConfig:
    base = dict(segments=2, sol_frames_per_segment=2, sol_visual_weights="random", audio_weights="random",
                random_seed=3, batch_frames=4, device="cpu")
    base.update(kw)
    return dataclasses.replace(ExtractConfig(), **base)


def test_registered_with_paper_shapes():
    cfg = ExtractConfig()
    assert get_extractor("resnet152_maps") is ResNet152MapsExtractor
    assert get_extractor("vggish_maps") is VGGishMapsExtractor
    specs = {s.name: (s.row_shape, s.dtype) for s in ResNet152MapsExtractor.specs_for(cfg)}
    assert specs == {"frame_maps": ((10, 4, 8, 8, 2048), "float16"), "frame_maps_scale": ((), "float32"),
                     "frame_times": ((10, 4), "float32"), "frame_index": ((10, 4), "int32")}
    assert [(s.name, s.row_shape, s.dtype) for s in VGGishMapsExtractor.specs_for(cfg)] == [
        ("audio_maps", (10, 6, 4, 512), "float16"), ("audio_maps_scale", (), "float32")]
    grid = ResNet152MapsExtractor.grid_for(cfg)
    assert grid.per_segment == 4 and grid.name == "rgb_f4_256_squash"
    # what changes the numbers changes the identity (and so the store fingerprint)
    a = ResNet152MapsExtractor.describe(_cfg(), {"resnet152": "w"})
    b = ResNet152MapsExtractor.describe(_cfg(sol_frames_per_segment=3), {"resnet152": "w"})
    assert a != b and a["preprocessing"]["image_size"] == 256


class SmallResNetMaps(ResNet152MapsExtractor):
    """The same extractor on 64x64 frames (2x2 maps) so the test runs in seconds."""

    image_size = 64


@pytest.mark.slow
def test_resnet152_maps_equal_torchvision_trunk():
    import torchvision

    cfg = _cfg(batch_frames=3)
    ext = SmallResNetMaps(cfg, "cpu")
    grid = ext.frame_grid.name
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (2, 2, 64, 64, 3), dtype=np.uint8)
    valid = np.array([[True, True], [True, False]])  # the last requested time is outside the stream
    index = np.array([[3, 9], [15, 21]])
    pts = index / 30.0
    video = DecodedVideo("v", {grid: frames}, {grid: valid}, None,
                         {"fps": 30.0, "frame_index": {grid: index}, "frame_pts": {grid: pts}})
    # reference: torchvision resnet152 with torchvision's init under the same seed, children[:-2]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.random_seed)
        net = torchvision.models.resnet152(weights=None)
    trunk = torch.nn.Sequential(*list(net.children())[:-2]).eval()
    ours = ext.model.state_dict()
    theirs = trunk.state_dict()
    assert list(ours) == list(theirs)
    # "random" = torchvision's init, seeded, with the last BN of each of the 50 residual branches
    # damped to gamma = 1/sqrt(50) (extract.nets.damp_residual_branches); nothing else differs
    damped = [k for k in ours if k.endswith("bn3.weight")]
    assert len(damped) == 50
    assert all(torch.equal(ours[k], theirs[k]) for k in ours if k not in damped)
    assert all(torch.allclose(ours[k], torch.full_like(ours[k], 50 ** -0.5)) for k in damped)
    with torch.no_grad():
        for name, module in trunk.named_modules():
            if name.endswith("bn3"):
                module.weight.fill_(50 ** -0.5)
    row = ext.compute([video])[0]
    x = (frames[valid].astype(np.float32) / 255.0 - MEAN) / STD
    with torch.no_grad():
        ref = trunk(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()  # [3, 2, 2, 2048]
    assert row["frame_maps"].shape == (2, 2, 2, 2, 2048) and row["frame_maps"].dtype == np.float16
    assert row["frame_maps_scale"].shape == () and row["frame_maps_scale"] == 1.0  # in range: no scaling
    np.testing.assert_allclose(row["frame_maps"][valid].astype(np.float32), ref, rtol=2e-3, atol=2e-3)
    assert not row["frame_maps"][1, 1].any()  # invalid frame: zeros
    np.testing.assert_array_equal(row["frame_index"], [[3, 9], [15, -1]])
    np.testing.assert_allclose(row["frame_times"], pts.astype(np.float32))
    np.testing.assert_array_equal(row["resnet152_maps_valid"], [True, True])  # 1 of 2 frames is enough
    assert np.abs(ref).max() > 0  # the comparison is not between zeros


def test_frame_index_fallback_from_fps():
    ext = object.__new__(SmallResNetMaps)  # no network needed for the time bookkeeping
    ext.cfg = _cfg(sol_frames_per_segment=4)
    grid = SmallResNetMaps.grid_for(ext.cfg).name
    video = DecodedVideo("v", {}, {}, None, {"fps": 10.0, "window": [1.0, 2.0]})
    times, index = ext._frame_times(video, grid)
    expected_times = 1.0 + np.arange(2)[:, None] + (np.arange(4)[None, :] + 0.5) / 4
    np.testing.assert_allclose(times, expected_times, rtol=1e-6)
    # the frame k/10 s nearest to each time (e.g. 1.375 s -> 13.75 -> frame 14)
    expected = np.array([[11, 14, 16, 19], [21, 24, 26, 29]])
    np.testing.assert_array_equal(index, expected)


def test_vggish_maps_are_the_trunk_of_the_vggish_embedding():
    from extract.audio import segment_patches
    from extract.extractors import VGGishExtractor

    cfg = _cfg(segments=3)
    rng = np.random.default_rng(1)
    wave = (0.1 * rng.standard_normal(int(16000 * 2.5))).astype(np.float32)  # covers 2 of 3 patches
    video = DecodedVideo("a", {}, {}, wave, {})
    maps_ext = VGGishMapsExtractor(cfg, "cpu")
    row = maps_ext.compute([video])[0]
    np.testing.assert_array_equal(row["vggish_maps_valid"], [True, True, False])
    assert row["audio_maps"].shape == (3, 6, 4, 512) and not row["audio_maps"][2].any()
    assert row["audio_maps"].dtype == np.float16 and row["audio_maps_scale"] == 1.0
    # direct forward of the conv trunk on the same patches
    patches, _ = segment_patches(wave, 3)
    with torch.no_grad():
        trunk = maps_ext.model.features(torch.from_numpy(patches[:2, None])).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(row["audio_maps"][:2].astype(np.float32), trunk, rtol=2e-3, atol=1e-3)
    # the stored maps, flattened in (h, w, c) order through VGGish's FC layers, give the embedding
    # the vggish extractor writes (same random weights)
    emb = VGGishExtractor(cfg, "cpu").compute([video])[0]["audio"]
    with torch.no_grad():
        fc = maps_ext.model.embeddings(torch.from_numpy(trunk.reshape(2, -1))).numpy()
    np.testing.assert_allclose(fc, emb[:2], rtol=1e-4, atol=1e-5)
    assert np.abs(emb[:2]).max() > 0


# -------------------------------------------------------------------------------------------------
# stored form: float16 + a per-row power-of-two scale; non-finite maps fail the row


def test_float16_with_scale_keeps_values_out_of_the_float16_range():
    from extract.sol_extractors import float16_with_scale

    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 7)).astype(np.float32)
    stored, scale = float16_with_scale(x)
    assert scale == 1.0 and stored.dtype == np.float16
    np.testing.assert_array_equal(stored, x.astype(np.float16))  # in range: exactly the plain cast
    for peak in (65504.0, 7e4, 3.3e5, 1e12, 3e38):
        y = x / np.abs(x).max() * np.float32(peak)
        stored, scale = float16_with_scale(y)
        assert np.isfinite(stored).all() and stored.dtype == np.float16
        k = np.log2(float(scale))
        assert k == int(k) and k >= 0  # a power of two
        assert float(np.abs(stored).max()) <= 65504.0 and (k == 0 or float(np.abs(stored).max()) > 65504.0 / 2.01)
        back = stored.astype(np.float32) * scale
        np.testing.assert_allclose(back, y, rtol=1e-3, atol=float(scale) * 2 ** -14)
    assert float16_with_scale(np.zeros((2, 2), np.float32))[1] == 1.0
    with pytest.raises(ValueError):
        float16_with_scale(np.array([1.0, np.inf], np.float32))


class _StubTrunk(torch.nn.Module):
    """[N, 3, h, w] -> [N, 2048, h/32, w/32]: each frame's mean (over the normalised input) times
    ``gain``; a frame whose mean exceeds ``nan_above`` gives NaN, one above ``inf_above`` inf."""

    def __init__(self, gain: float, nan_above: float = np.inf, inf_above: float = np.inf):
        super().__init__()
        self.gain, self.nan_above, self.inf_above = gain, nan_above, inf_above

    def forward(self, x):
        m = x.float().mean(dim=(1, 2, 3))
        y = (m * self.gain)[:, None, None, None].expand(x.shape[0], 2048, x.shape[2] // 32, x.shape[3] // 32).clone()
        y[m > self.nan_above] = float("nan")
        y[m > self.inf_above] = float("inf")
        return y


def _frame_video(key: str, cfg, level: int, grid: str, size: int = 64) -> DecodedVideo:
    T, F = cfg.segments, cfg.sol_frames_per_segment
    frames = np.full((T, F, size, size, 3), level, np.uint8)
    return DecodedVideo(key, {grid: frames}, {grid: np.ones((T, F), bool)}, None, {"fps": 10.0})


def _stubbed_resnet(cfg, model) -> SmallResNetMaps:
    ext = object.__new__(SmallResNetMaps)  # the real __init__ builds ResNet-152: not needed here
    from extract.weights import resolve_weights

    ext.cfg, ext.device, ext.precision = cfg, "cpu", "fp32"
    ext.weights = resolve_weights("random", "resnet152", seed=cfg.random_seed)
    ext.model = model
    return ext


def test_resnet152_maps_beyond_float16_are_scaled_not_inf():
    cfg = _cfg()
    ext = _stubbed_resnet(cfg, _StubTrunk(gain=1e6))
    grid = ext.frame_grid.name
    dark, bright = _frame_video("dark", cfg, 30, grid), _frame_video("bright", cfg, 250, grid)
    rows = ext.compute([dark, bright])
    for video, row in zip((dark, bright), rows):
        stored, scale = row["frame_maps"], float(row["frame_maps_scale"])
        assert stored.dtype == np.float16 and np.isfinite(stored).all()
        assert scale > 1 and np.log2(scale) == int(np.log2(scale))
        x = (video.frames[grid][0, 0].astype(np.float32) / 255.0 - MEAN) / STD
        expected = x.mean() * 1e6
        np.testing.assert_allclose(stored.astype(np.float32) * scale, expected, rtol=1e-3)
    ext.model = _StubTrunk(gain=3.0)
    assert ext.compute([bright])[0]["frame_maps_scale"] == 1.0


def test_non_finite_maps_fail_that_row_only():
    """NaN/inf in one video's float32 maps: compute raises, the runner retries the batch video by
    video and marks only that one failed (not "missing": the reason is no machine error)."""
    from extract.run import Failure, SystemFailure, compute_videos, is_system_error
    from extract.sol_extractors import NonFiniteMaps

    cfg = _cfg()
    ext = _stubbed_resnet(cfg, _StubTrunk(gain=1.0, nan_above=1.5, inf_above=2.0))
    grid = ext.frame_grid.name
    good = _frame_video("good", cfg, 100, grid)
    nan = _frame_video("nan", cfg, 215, grid)  # mean of the normalised frame ~1.74: NaN
    inf = _frame_video("inf", cfg, 255, grid)  # ~2.44: inf
    with pytest.raises(NonFiniteMaps) as info:
        ext.compute([good, inf])
    message = str(info.value)
    n = 2 * 2 * 2 * 2 * 2048  # T * F * 2 * 2 * channels
    assert f"resnet152_maps: {n} non-finite values (0 NaN, {n} inf) in the frame_maps of 'inf'" in message
    assert "ResNet-152, random init seed 3" in message and "failed" in message
    assert not is_system_error(info.value)
    results = compute_videos([ext], [good, nan, inf], cfg.segments)
    assert isinstance(results[0], dict) and results[0]["frame_maps_scale"] == 1.0
    for result, what in zip(results[1:], ("NaN", "inf")):
        assert isinstance(result, Failure) and not isinstance(result, SystemFailure)
        assert "non-finite values" in result.reason and f"{n} {what}" in result.reason


def test_vggish_maps_non_finite_fail_and_large_values_are_scaled():
    from extract.run import Failure, SystemFailure, compute_videos

    cfg = _cfg(segments=2)
    ext = VGGishMapsExtractor(cfg, "cpu")
    rng = np.random.default_rng(2)
    loud = DecodedVideo("loud", {}, {}, (0.1 * rng.standard_normal(32000)).astype(np.float32), {})
    quiet = DecodedVideo("quiet", {}, {}, (0.01 * rng.standard_normal(32000)).astype(np.float32), {})
    reference = ext.compute([loud])[0]
    assert reference["audio_maps_scale"] == 1.0
    with torch.no_grad():  # the last conv's output x 1e6: past float16, still finite in float32
        ext.model.features[13].weight.mul_(1e6)
        ext.model.features[13].bias.mul_(1e6)
    big = ext.compute([loud])[0]
    scale = float(big["audio_maps_scale"])
    assert scale > 1 and np.isfinite(big["audio_maps"]).all()
    np.testing.assert_allclose(big["audio_maps"].astype(np.float32) * scale / 1e6,
                               reference["audio_maps"].astype(np.float32), rtol=5e-3, atol=1e-3)

    class Poisoned(torch.nn.Module):
        """The trunk, with one NaN per patch for patches quieter (lower mean log-mel) than ``below``."""

        def __init__(self, features, below: float):
            super().__init__()
            self.inner, self.below = features, below

        def forward(self, x):
            y = self.inner(x).clone()
            y[x.mean(dim=(1, 2, 3)) < self.below, 0, 0, 0] = float("nan")
            return y

    with torch.no_grad():
        ext.model.features[13].weight.div_(1e6)
        ext.model.features[13].bias.div_(1e6)
    from extract.audio import segment_patches

    m_loud, m_quiet = (float(segment_patches(v.audio, 2)[0].mean()) for v in (loud, quiet))
    assert m_quiet < m_loud
    ext.model.features = Poisoned(ext.model.features, (m_loud + m_quiet) / 2)
    ok, bad = compute_videos([ext], [loud, quiet], cfg.segments)
    assert isinstance(ok, dict) and ok["audio_maps_scale"] == 1.0
    assert isinstance(bad, Failure) and not isinstance(bad, SystemFailure)
    assert "vggish_maps: 2 non-finite values (2 NaN, 0 inf) in the audio_maps of 'quiet'" in bad.reason
    assert "VGGish, random init seed 3" in bad.reason


def test_store_round_trip_and_read_scaled(tmp_path):
    """Both extractors' arrays in a store: read_scaled gives float16 when every scale is 1 (or 0:
    a row never written), float32 multiplied by each row's scale otherwise."""
    from extract.core.store import create_store, open_store

    cfg = _cfg(segments=2)
    specs = SmallResNetMaps.specs_for(cfg) + VGGishMapsExtractor.specs_for(cfg)
    store = create_store(tmp_path / "s.zarr", ["a", "b", "c"], 2, specs, {}, rows_per_shard=2)
    rng = np.random.default_rng(0)
    maps = rng.standard_normal((3, 2, 2, 2, 2, 2048)).astype(np.float16)
    store.write_shard(0, {"frame_maps": maps[:2], "frame_maps_scale": np.array([1.0, 1.0], np.float32)},
                      np.ones(2, np.int8), ["", ""])
    store = open_store(tmp_path / "s.zarr")
    out = store.read_scaled("frame_maps")
    assert out.dtype == np.float16  # row c never written: scale 0, maps 0
    np.testing.assert_array_equal(out[:2], maps[:2])
    assert not out[2].any()
    store = open_store(tmp_path / "s.zarr", mode="r+")
    store.write_shard(1, {"frame_maps": maps[2:], "frame_maps_scale": np.array([8.0], np.float32)},
                      np.ones(1, np.int8), [""])
    out = store.read_scaled("frame_maps")
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out[:2], maps[:2].astype(np.float32))
    np.testing.assert_array_equal(out[2], maps[2].astype(np.float32) * 8)
    picked = store.read_scaled("frame_maps", [2, 0])
    np.testing.assert_array_equal(picked, out[[2, 0]])
    assert store.read_scaled("frame_maps", [0, 1]).dtype == np.float16
    assert store.read_scaled("audio_maps").dtype == np.float16  # all scales 0: nothing written
