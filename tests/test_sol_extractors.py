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
    assert specs == {"frame_maps": ((10, 4, 8, 8, 2048), "float16"), "frame_times": ((10, 4), "float32"),
                     "frame_index": ((10, 4), "int32")}
    assert [(s.name, s.row_shape, s.dtype) for s in VGGishMapsExtractor.specs_for(cfg)] == [("audio_maps", (10, 6, 4, 512), "float16")]
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
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)  # "random" = torchvision's init, seeded
    # randomly initialised residual blocks blow activations up past float16; damp every block's
    # last batch norm (in both copies) so the maps stay in range
    with torch.no_grad():
        for name, module in list(ext.model.named_modules()) + list(trunk.named_modules()):
            if name.endswith("bn3"):
                module.weight.mul_(0.1)
    row = ext.compute([video])[0]
    x = (frames[valid].astype(np.float32) / 255.0 - MEAN) / STD
    with torch.no_grad():
        ref = trunk(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()  # [3, 2, 2, 2048]
    assert row["frame_maps"].shape == (2, 2, 2, 2, 2048) and row["frame_maps"].dtype == np.float16
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
