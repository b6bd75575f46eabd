"""Extractors (extract/extractors.py) on tiny synthetic decoded videos with random weights.

Tiny frames (32x32 -> pool5 1x1) keep VGG-19 affordable on 2 CPU cores; the computation is the
same at 224x224 (7x7).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle

import numpy as np
import pytest
import torch

from extract import audio, extractors
from extract.config import ExtractConfig
from extract.extractors import (
    DecodedVideo,
    VGG19Extractor,
    VGGishExtractor,
    build_extractors,
    extractor_identity,
    register_extractor,
)
from extract.core.frames import prepare_frames
from extract.nets import build_vgg19_pool5, normalize_frames
from extract.core.store import core_specs

torch.set_num_threads(2)

T, F, SIZE = 2, 3, 32
CFG = ExtractConfig(
    segments=T,
    frames_per_segment=F,
    image_size=SIZE,
    visual_weights="random",
    audio_weights="random",
    random_seed=3,
    batch_frames=4,
    device="cpu",
)
GRID = VGG19Extractor.grid_for(CFG).name


def make_video(key: str, seed: int, frame_valid: np.ndarray, audio_seconds: float | None) -> DecodedVideo:
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, (T, F, SIZE, SIZE, 3), dtype=np.uint8)
    frames[~frame_valid] = 255  # content of invalid frames must not reach the averages
    wave = None if audio_seconds is None else (rng.standard_normal(int(audio_seconds * 16000)) * 0.1).astype(np.float32)
    return DecodedVideo(key, {GRID: frames}, {GRID: frame_valid}, wave, {"fps": 25.0})


# A: segment 1 has 2 of 3 frames (valid); B: segment 0 has 1 of 3 frames (invalid); C: all frames
VIDEO_A = make_video("a", 1, np.array([[True, True, True], [True, False, True]]), 2.5)
VIDEO_B = make_video("b", 2, np.array([[False, True, False], [True, True, True]]), 1.2)
VIDEO_C = make_video("c", 3, np.ones((T, F), bool), None)


@pytest.fixture(scope="module")
def vgg() -> VGG19Extractor:
    return VGG19Extractor(CFG, "cpu")


@pytest.fixture(scope="module")
def vgg_rows(vgg):
    return vgg.compute([VIDEO_A, VIDEO_B])


@pytest.fixture(scope="module")
def vggish() -> VGGishExtractor:
    return VGGishExtractor(CFG, "cpu")


def reference_visual(model, video: DecodedVideo) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame (batch of 1) forward of an independently built network, float64 mean, channel-last."""
    valid = video.frame_valid[GRID]
    out = np.zeros((T, 1, 1, 512))
    seg_valid = valid.sum(axis=1) >= 2  # at least half of the 3 frames
    for t in range(T):
        if not seg_valid[t]:
            continue
        feats = []
        for f in np.nonzero(valid[t])[0]:
            with torch.inference_mode():
                y = model(normalize_frames(video.frames[GRID][t, f][None]))
            feats.append(y[0].double().numpy().transpose(1, 2, 0))
        out[t] = np.mean(feats, axis=0)
    return out, seg_valid


def test_vgg19_matches_per_frame_forward_and_mean(vgg_rows):
    model = build_vgg19_pool5("random", seed=CFG.random_seed)
    for video, row in zip([VIDEO_A, VIDEO_B], vgg_rows):
        expected, seg_valid = reference_visual(model, video)
        assert row["visual"].dtype == np.float16 and row["visual"].shape == (T, 1, 1, 512)
        np.testing.assert_array_equal(row["vgg19_valid"], seg_valid)
        scale = np.abs(expected).max()
        np.testing.assert_allclose(row["visual"].astype(np.float64), expected, rtol=2e-3, atol=1e-3 * scale)
    assert not vgg_rows[1]["visual"][0].any()  # invalid segment is zeros
    assert vgg_rows[0]["vgg19_valid"].all()


def test_vgg19_rows_do_not_depend_on_batch_companions(vgg, vgg_rows):
    """A's 5 and B's 4 valid frames land at other positions of other 4-frame chunks."""
    swapped = vgg.compute([VIDEO_B, VIDEO_A])
    with_c = vgg.compute([VIDEO_C, VIDEO_A, VIDEO_B])
    for rows, a_index, b_index in ((swapped, 1, 0), (with_c, 1, 2)):
        np.testing.assert_array_equal(rows[a_index]["visual"], vgg_rows[0]["visual"])
        np.testing.assert_array_equal(rows[b_index]["visual"], vgg_rows[1]["visual"])


def test_vgg19_bf16_on_cpu_is_close_to_fp32(vgg, vgg_rows):
    low = VGG19Extractor(dataclasses.replace(CFG, precision="bf16"), "cpu")
    assert low.precision == "bf16"
    rows = low.compute([VIDEO_A, VIDEO_B])
    ref = np.concatenate([r["visual"].astype(np.float64).ravel() for r in vgg_rows])
    got = np.concatenate([r["visual"].astype(np.float64).ravel() for r in rows])
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    print(f"bf16 vs fp32 relative error (random VGG-19, 32x32): {rel:.4f}")
    assert 0 < rel < 0.05  # measured ~0.01; nonzero proves the bf16 path ran
    # fp16 is not used on CPU: it runs fp32
    half = VGG19Extractor(dataclasses.replace(CFG, precision="fp16"), "cpu")
    assert half.precision == "fp32"


def test_vgg19_rejects_mismatched_videos(vgg):
    bad = dataclasses.replace(VIDEO_C, frame_valid={GRID: np.ones((T + 1, F), bool)})
    with pytest.raises(ValueError, match="'c'.*extract.segments=2"):
        vgg.compute([bad])
    with pytest.raises(ValueError, match="no frames for grid"):
        vgg.compute([dataclasses.replace(VIDEO_C, frames={}, frame_valid={})])


def test_frame_grid_and_arrays(vgg):
    grid = vgg.frame_grid
    assert grid.per_segment == F and grid.name == GRID
    frames = np.random.default_rng(0).integers(0, 256, (2, 48, 64, 3), dtype=np.uint8)
    prepare = pickle.loads(pickle.dumps(grid.prepare))  # decode workers receive it pickled
    np.testing.assert_array_equal(prepare(frames), prepare_frames(frames, SIZE, "squash"))
    # with the defaults the arrays are exactly the store contract's
    default = ExtractConfig()
    assert VGG19Extractor.specs_for(default) + VGGishExtractor.specs_for(default) == [
        s for s in core_specs(10) if s.name in ("visual", "audio")
    ]
    assert vgg.arrays()[0].row_shape == (T, 1, 1, 512)


def test_vggish_rows_validity_and_missing_audio(vggish):
    rows = vggish.compute([VIDEO_A, VIDEO_B, VIDEO_C])
    for video, row in zip([VIDEO_A, VIDEO_B], rows):
        patches, valid = audio.segment_patches(video.audio, T)
        np.testing.assert_array_equal(row["vggish_valid"], valid)
        for t in range(T):
            if valid[t]:
                with torch.inference_mode():
                    expected = vggish.model(torch.from_numpy(patches[t][None, None]))[0].numpy()
                np.testing.assert_allclose(row["audio"][t], expected, rtol=1e-5, atol=1e-6)
            else:
                assert not row["audio"][t].any()
        assert row["audio"].dtype == np.float32 and row["audio"].shape == (T, 128)
    np.testing.assert_array_equal(rows[0]["vggish_valid"], [True, True])  # 2.5 s covers 1.975 s
    np.testing.assert_array_equal(rows[1]["vggish_valid"], [True, False])  # 1.2 s does not
    assert not rows[2]["vggish_valid"].any() and not rows[2]["audio"].any()  # no audio at all
    # rows do not depend on companions
    np.testing.assert_array_equal(vggish.compute([VIDEO_B])[0]["audio"], rows[1]["audio"])


def test_vggish_pca_option_applies_postprocessing(vggish, monkeypatch):
    from extract.nets import build_vggish_pca

    weights, pca_weights = VGGishExtractor.resolve(dataclasses.replace(CFG, vggish_pca=True))
    assert pca_weights is not None and pca_weights.identity()["sha256"] == "random"
    pca = build_vggish_pca(pca_weights)
    monkeypatch.setattr(vggish, "pca", pca)
    row = vggish.compute([VIDEO_A])[0]
    patches, _ = audio.segment_patches(VIDEO_A.audio, T)
    with torch.inference_mode():
        expected = pca(vggish.model(torch.from_numpy(patches[:, None]))).numpy()
    np.testing.assert_allclose(row["audio"], expected, atol=1.0)  # quantisation steps are 1
    assert np.all(row["audio"] == np.round(row["audio"])) and row["audio"].max() <= 255


def test_identity_without_building_networks(vgg, vggish, tmp_path):
    ident = extractor_identity(CFG)
    assert ident == {"vgg19": vgg.identity(), "vggish": vggish.identity()}
    json.dumps(ident)  # plain JSON
    assert ident["vgg19"]["weights"]["vgg19"] == {"name": "random", "sha256": "random", "seed": 3}
    assert extractor_identity(dataclasses.replace(CFG, random_seed=4)) != ident
    assert extractor_identity(dataclasses.replace(CFG, image_size=64))["vgg19"] != ident["vgg19"]
    path = tmp_path / "vgg19_custom.pth"
    path.write_bytes(b"not loaded, only hashed")
    custom = extractor_identity(dataclasses.replace(CFG, visual_weights=str(path), extractors=["vgg19"]))
    assert custom["vgg19"]["weights"]["vgg19"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_registry_refuses_duplicates_and_unknown_names():
    with pytest.raises(ValueError, match="already registered"):
        register_extractor("vgg19")(type("Other", (extractors.Extractor,), {}))
    with pytest.raises(ValueError, match="unknown extractor 'resnet'.*vgg19"):
        build_extractors(dataclasses.replace(CFG, extractors=["resnet"]), "cpu")
    with pytest.raises(ValueError, match="twice"):
        build_extractors(dataclasses.replace(CFG, extractors=["vggish", "vggish"]), "cpu")
